"""circuitdiff.parallel on a local 2-CPU Ray cluster (one per module): two workers give one process's results.

Every check compares against the one-process computation (circuitdiff.attribute, the HF backend, a
`circuitdiff run` without workers), never against the parallel path itself.
"""

import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (scripts/setup.sh installs it)")

from circuitdiff.attribute import attribute  # noqa: E402
from circuitdiff.cli import main as cli_main  # noqa: E402
from circuitdiff.errors import UserError  # noqa: E402
from circuitdiff.io import read_jsonl_tolerant as read_rows  # noqa: E402
from circuitdiff.parallel.attribution import attribute_sharded  # noqa: E402
from circuitdiff.parallel.pool import KILL_ENV, Pool  # noqa: E402
from circuitdiff.pipeline import run  # noqa: E402
from circuitdiff.store import layout  # noqa: E402
from circuitdiff.store.artifacts import Attribution  # noqa: E402
from pipeline_helpers import save_tiny_lm  # noqa: E402
from test_run import make_config, pair, world  # noqa: E402,F401  (fixtures: the tiny pair and its questions)
from tiny import tiny_samples  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    """One local cluster with 2 CPUs and one pool of 2 workers (1 CPU each) for the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        with Pool(2, log=lambda *_: None, ready_timeout=120) as workers:
            yield workers
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_lm(tmp_path_factory.mktemp("m") / "lm", seed=1))


def _samples():
    """Samples of many lengths (so the shards differ), ids inside the byte vocabulary."""
    out = tiny_samples(seed=4, n=11, vocab=258)
    out[3]["prompt_ids"] = out[3]["prompt_ids"] * 9  # one long sample
    return out


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over every entry, relative to the largest |b| of the same sample."""
    scale = np.abs(b).reshape(len(b), -1).max(axis=1)
    return float((np.abs(a - b).reshape(len(b), -1).max(axis=1) / scale).max())


def _same(par: Attribution, one: Attribution) -> None:
    assert par.src_names == one.src_names and par.dst_names == one.dst_names
    assert np.array_equal(par.edge_mask, one.edge_mask)
    assert max_relative_difference(par.scores, one.scores) <= 1e-6
    np.testing.assert_allclose(par.loss, one.loss, rtol=1e-6)
    assert par.meta == one.meta


def test_two_workers_give_one_process_W(pool, model, tmp_path):
    samples = _samples()
    one = attribute(model, samples, batch_size=2)
    logs = []
    par = attribute_sharded(pool, model, samples, batch_size=2, work_dir=tmp_path / "parts", log=logs.append)
    _same(par, one)
    assert "6 shards over 2 workers, 0 already done, 6 to compute" in logs[0]


def test_resume_recomputes_only_a_lost_or_damaged_shard(pool, model, tmp_path):
    samples, work = _samples(), tmp_path / "parts"
    one = attribute(model, samples, batch_size=2, objective="logit")
    attribute_sharded(pool, model, samples, batch_size=2, objective="logit", work_dir=work, log=lambda *_: None)
    files = sorted(work.glob("shard-*.npz"))
    assert len(files) == 6
    files[2].unlink()  # lost
    files[4].write_bytes(files[4].read_bytes()[:100])  # cut off
    kept = {f: f.stat().st_mtime_ns for f in files if f not in (files[2], files[4])}
    logs = []
    par = attribute_sharded(pool, model, samples, batch_size=2, objective="logit", work_dir=work, log=logs.append)
    _same(par, one)
    assert any("is damaged; redoing that shard" in line for line in logs)
    assert any("6 shards over 2 workers, 4 already done, 2 to compute" in line for line in logs)
    assert {f: f.stat().st_mtime_ns for f in kept} == kept  # the finished shards were not rewritten


def test_a_worker_killed_mid_shard_loses_only_that_shard(pool, model, tmp_path, monkeypatch):
    samples = _samples()
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"1:{marker}")
    logs = []
    par = attribute_sharded(pool, model, samples, batch_size=2, work_dir=tmp_path / "parts", log=logs.append)
    assert marker.exists()  # the worker did die (SIGKILL after loading the model, before scoring shard 1)
    died = [line for line in logs if "a worker died during" in line]
    assert len(died) == 1 and "shard 2/6" in died[0]
    _same(par, attribute(model, samples, batch_size=2))
    assert len(pool.actors) == 2  # the dead worker was replaced


def test_a_user_error_in_a_worker_is_the_same_one_line(pool, model, tmp_path):
    samples = _samples()
    samples[7]["prompt_ids"][0] = 999  # outside the 258-id vocabulary
    with pytest.raises(UserError, match=r"^sample 7: token id 999 is outside the model's vocabulary"):
        attribute_sharded(pool, model, samples, work_dir=tmp_path / "parts", log=lambda *_: None)


def test_more_gpus_than_the_cluster_has_is_one_line(pool):
    with pytest.raises(UserError, match=r"2 workers x 1 GPU each need 2 GPUs, the Ray cluster has 0"):
        Pool(2, gpus_per_worker=1, log=lambda *_: None).open()
    assert ray.is_initialized()  # the module's cluster was joined, not shut down


def test_cli_attribute_with_two_workers_writes_the_same_file(pool, model, tmp_path, capsys):
    import json

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(s) + "\n" for s in _samples()))
    common = ["attribute", "--model", model, "--samples", str(samples), "--batch-size", "3", "--objective", "logit"]
    assert cli_main(common + ["--out", str(tmp_path / "one.npz")]) == 0
    pool.close()  # the command starts its own two workers on the module's 2-CPU cluster
    try:
        assert cli_main(common + ["--out", str(tmp_path / "two.npz"), "--workers", "2"]) == 0
    finally:
        pool.open()
    assert ray.is_initialized()  # the command joined the running cluster and left it running
    _same(Attribution.load(tmp_path / "two.npz"), Attribution.load(tmp_path / "one.npz"))
    assert not (tmp_path / "two.npz.parts").exists()


def test_pipeline_with_two_workers_equals_one_process(pool, pair, world, tmp_path):  # noqa: F811
    """generate -> attribute with both text views: the generations files byte for byte, every W file equal."""
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    quiet = dict(progress=False, log=lambda *_: None, until="attribute")
    run(make_config(pair, world["data"], text="both", objective=["nll", "logit"]), one_dir, **quiet)
    timings: dict = {}
    run(make_config(pair, world["data"], text="both", objective=["nll", "logit"], parallel={"workers": 2}), two_dir,
        pool=pool, timings=timings, **quiet)
    assert set(timings) == {"generate", "grade", "select", "attribute"}
    for role in layout.ROLES:
        one, two = layout.generations(one_dir, role, "gsm8k"), layout.generations(two_dir, role, "gsm8k")
        assert one.read_bytes() == two.read_bytes()
        assert len(read_rows(one)) == 12
    found_one, found_two = layout.find_attributions(one_dir), layout.find_attributions(two_dir)
    assert found_one.keys() == found_two.keys() and len(found_one) == 4  # 2 objectives x 2 alphas
    for where, views in found_one.items():
        assert views.keys() == found_two[where].keys() and len(views) == 4
        for scored, path in views.items():
            _same(Attribution.load(found_two[where][scored]), Attribution.load(path))
            assert layout.key_file(path).read_bytes() == layout.key_file(found_two[where][scored]).read_bytes()
    assert not layout.shards_dir(two_dir, "attribute").exists() and not layout.shards_dir(two_dir, "generate").exists()


@pytest.mark.smollm
def test_smollm2_two_workers_same_W_and_same_tokens(pool, tmp_path):
    """The real SmolLM2-135M-Instruct: answers token for token as one process, W within 1e-6."""
    import torch

    from circuitdiff.data import load_problems
    from circuitdiff.decoding import HFBackend
    from circuitdiff.models import load_model
    from circuitdiff.parallel.plan import batches_by_length, plan_shards
    from circuitdiff.parallel.pool import Load
    from circuitdiff.parallel.shards import run_sharded
    from circuitdiff.prompts import encode
    from circuitdiff.stages.generate import answer_batches, answerer

    spec = "smollm2-135m-instruct"
    loaded = load_model(spec)
    problems = load_problems("arith", "test", None, 8)
    prompts = [encode(p.question, loaded.tokenizer, "chat") for p in problems]
    batches = batches_by_length([len(p) for p in prompts], 3)
    one = {}
    for batch in batches:
        for i, gen in zip(batch, HFBackend(loaded.model, loaded.tokenizer, 24).generate([prompts[i] for i in batch])):
            one[problems[i].idx] = gen.answer_ids
    load = Load.of(answerer, spec=spec, trust_remote_code=False, dtype="float32", device="cpu",
                   attn_implementation="sdpa", backend="hf", max_new_tokens=24)
    shards = plan_shards(batches, [1.0] * len(batches), 2)
    results = run_sharded(pool, shards, folder=tmp_path / "gen", job_key="k", suffix=".jsonl", load=load,
                          fn=answer_batches, save=lambda *_: None, read=lambda _: None, name="generate", log=print,
                          payload=lambda s: {"batches": [[(problems[i], prompts[i]) for i in b] for b in s.batches],
                                             "rule": "strict"})
    two = {row["idx"]: row["answer_ids"] for rows in results for row in rows}
    assert two == one and any(len(a) > 5 for a in one.values())

    samples = [{"prompt_ids": prompts[i], "answer_ids": one[problems[i].idx], "cut_len": min(6, len(one[problems[i].idx]))}
               for i in range(4) if one[problems[i].idx]]
    # one process with the workers' thread count (1 CPU each): float32 sums in another order (1 vs 2 torch threads
    # in ONE process) already differ by 6.5e-6 of max |W| on these samples, sharding or not
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = attribute(loaded, samples, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    par = attribute_sharded(pool, spec, samples, batch_size=1, work_dir=tmp_path / "parts", log=lambda *_: None)
    ref.meta["model_info"] = par.meta["model_info"]  # the one-process model here was loaded with its tokenizer
    _same(par, ref)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([os.path.abspath(__file__), "-q"]))
