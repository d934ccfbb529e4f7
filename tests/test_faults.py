"""Fault injection on a small run with every stage: kill -9 at seeded write points of every stage, then
resume; damage each kind of artifact three ways, then rerun. (docs/reliability.md: the table and the command
that makes it.)

Every case runs the CLI in a fresh process (tiny models, about 6 s a run); two cases run side by side.
"""

from __future__ import annotations

import faults
import pytest

from circuitdiff.store import layout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    config = faults.make_world(root)
    reference_run, log = root / "reference", root / "points.log"
    result = faults.run_all(config, reference_run, fault_log=log)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, config, reference_run, faults.snapshot(reference_run), log


def test_the_reference_run_has_every_stage(world):
    _, _, reference_run, reference, log = world
    for kind, rel in faults.ARTIFACTS.items():
        assert (reference_run / rel).exists(), kind
    assert any(rel.startswith("report/") for rel in reference)
    points = faults.kill_points(log)
    assert {stage for _, stage, _ in points} == {stage for *_, stage in faults.STAGE_OF}
    assert len(points) >= 10


def test_kill_anywhere_then_resume_gives_identical_outputs(world):
    root, config, _, reference, log = world
    points = faults.kill_points(log)
    outcomes = faults.kill_cases(config, root, reference, points)
    failed = [(p, o) for p, o in zip(points, outcomes) if o != "identical"]
    assert not failed, failed
    assert not layout.stale_temp_files(root / f"kill-{points[0][0]}")  # a resumed run leaves no temporary file


def test_every_damaged_artifact_is_recomputed_or_a_clean_error(world):
    root, config, reference_run, reference, _ = world
    outcomes = faults.damage_cases(config, root, reference_run, reference)
    wrong = {case: o for case, o in outcomes.items() if o.startswith("WRONG")}
    assert not wrong, wrong
    # what may only be an error: a damaged generations meta file (its answers cannot be matched to settings)
    assert all(outcomes[("generations meta", how)].startswith("error: ") for how in faults.DAMAGES)
    assert all(outcomes[("manifest", how)] in ("recomputed", "rewritten (model-load records return when the models next "
                                               "load)") for how in faults.DAMAGES)
    assert outcomes[("attribution W", "bit-flipped")] == "recomputed"
    assert outcomes[("generations rows", "truncated")] == "recomputed"
