"""The package's shape (no import cycle, paths in the store alone, small files), torch-free reading,
and the store's keys: up to date is skipped, changed settings and damaged outputs are redone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_validate import _tiny_run

from circuitdiff.config import ValidationConfig
from circuitdiff.stages import validate as validate_stage
from circuitdiff.store import keys, layout

ROOT = Path(__file__).resolve().parents[1]


def test_structure_checks_pass():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_structure
    finally:
        sys.path.pop(0)
    assert check_structure.problems() == []
    # the checker is not vacuous: it sees the package's imports and would see a cycle
    edges = check_structure.graph()
    assert "circuitdiff.engine.attributor" in edges["circuitdiff.attribute"] or "circuitdiff.engine" in edges["circuitdiff.attribute"]
    assert check_structure.cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_reading_results_and_the_cli_parser_do_not_import_torch(tmp_path):
    """Reports, artifacts and `--help` need numpy (and matplotlib), never torch."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from report_fixture import make_run
from circuitdiff.report import Settings, build_report
from circuitdiff.store import artifacts, layout
from circuitdiff.cli import build_parser
run = make_run({str(tmp_path)!r}, n=6)
build_report(run, Settings(n_boot=100, n_perm=100))
artifacts.Attribution.load(layout.attribution(run, "base", "planted", 0.1))
build_parser().format_help()
import circuitdiff
circuitdiff.Attribution, circuitdiff.Graph
print("torch" in sys.modules, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_key_files_skip_redo_and_detect_damage(tmp_path):
    artifact = tmp_path / "x.json"
    artifact.write_text("{}")
    settings = {"a": 1}
    k1 = keys.settings_key(settings)
    assert not keys.up_to_date(artifact, k1)  # no key file yet
    keys.write_key(artifact, k1, settings)
    assert keys.read_key(artifact) == k1 and keys.up_to_date(artifact, k1)
    assert not keys.up_to_date(artifact, keys.settings_key({"a": 2}))
    # a key file whose record was damaged no longer vouches for the artifact
    record = layout.key_file(artifact)
    good = record.read_text()
    record.write_text(good.replace('"a": 1', '"a": 7'))
    assert not keys.up_to_date(artifact, k1)
    record.write_text(good)
    artifact.write_text("{ }")  # same length, other bytes
    lines = []
    assert not keys.up_to_date(artifact, k1, lines.append)
    assert "damaged" in lines[0] and str(artifact) in lines[0]
    assert keys.settings_key({"b": 2, "a": 1}) == keys.settings_key({"a": 1, "b": 2})


def test_validation_stage_is_keyed(tmp_path, monkeypatch):
    """Up to date: skipped (the computation is not called). Changed setting or damaged file: redone."""
    _, run, _ = _tiny_run(tmp_path)
    calls = []
    real = __import__("circuitdiff.validate", fromlist=["validate"]).validate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("max_edges"))
        return real(*args, **kwargs)

    monkeypatch.setattr("circuitdiff.validate.validate", counting)
    settings = ValidationConfig(n_samples=2, batch_size=8)
    log = []
    validate_stage.validate_one(run, "tuned", "gsm8k", 0.1, settings, log=log.append)
    path = layout.validation(run, "tuned", "gsm8k", 0.1)
    first = json.loads(path.read_text())
    validate_stage.validate_one(run, "tuned", "gsm8k", 0.1, settings, log=log.append)
    assert len(calls) == 1 and "up to date" in log[-1]
    # a batch size changes no result: still up to date
    validate_stage.validate_one(run, "tuned", "gsm8k", 0.1, settings.model_copy(update={"batch_size": 5}), log=log.append)
    assert len(calls) == 1
    # another edge subset is another result
    validate_stage.validate_one(run, "tuned", "gsm8k", 0.1, settings.model_copy(update={"max_edges": 5}), log=log.append)
    assert len(calls) == 2 and json.loads(path.read_text())["n_edges"] == 5
    validate_stage.validate_one(run, "tuned", "gsm8k", 0.1, settings, log=log.append)
    assert len(calls) == 3
    # a damaged file is recomputed, identically
    path.write_text(path.read_text().replace('"summary"', '"summarx"'))
    validate_stage.validate_one(run, "tuned", "gsm8k", 0.1, settings, log=log.append)
    assert len(calls) == 4 and any("damaged" in line for line in log)
    again = json.loads(path.read_text())
    for key in ("summary", "edges", "clean_loss"):
        assert again[key] == first[key]


@pytest.mark.parametrize("stage_name", ["validation", "intervention"])
def test_optional_stages_run_only_when_configured(stage_name):
    from circuitdiff.demo import demo_config

    cfg = demo_config(limit=3)
    assert getattr(cfg, stage_name) is not None
    off = demo_config(limit=3, validate_samples=0, intervene_questions=0)
    assert getattr(off, stage_name) is None
