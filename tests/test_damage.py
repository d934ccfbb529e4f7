"""Damaged files and bad input: detected and recomputed, or one clear error line, never a silent wrong table.

The pair of tiny models and the dataset come from test_run.py (generations whose golds are the base's own
answers); every case damages one thing and checks what the next command does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_run import make_config, pair, world  # noqa: F401  (fixtures)
from tiny import tiny_model, tiny_samples

from circuitdiff.attribute import Attribution, attribute
from circuitdiff.cli import main
from circuitdiff.errors import UserError
from circuitdiff.io import DamagedFile, read_jsonl_tolerant
from circuitdiff.pipeline import RunContext, run_stages
from circuitdiff.report.accuracy import accuracy_rows
from circuitdiff.store import layout


def _run(pair, world, run, until="intervention", **over):
    log = []
    run_stages(RunContext(make_config(pair, world["data"], alphas=[0.1], **over), run, progress=False,
                          log=log.append), until=until)
    return log


def _damage_line(path, number: int) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = lines[number - 1][: len(lines[number - 1]) // 2]  # cut inside the line
    path.write_bytes(b"\n".join(lines))


def test_a_damaged_generations_line_is_an_error_for_readers_and_regenerated_by_the_run(pair, world, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    _run(pair, world, run)
    path = layout.generations(run, "tuned", "gsm8k")
    before = {r["idx"]: r for r in read_jsonl_tolerant(path)}
    _damage_line(path, 5)
    # the report's accuracy reader refuses, naming the file and line (it used to count the 4 rows before it)
    with pytest.raises(DamagedFile, match=r"gsm8k.jsonl line 5 is damaged"):
        accuracy_rows(run)
    # a cut-off LAST line is what a kill leaves: ignored, not damage
    last = tmp_path / "last.jsonl"
    last.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert read_jsonl_tolerant(last) == [{"a": 1}, {"a": 2}]
    # the run keeps the 4 rows before the damage and answers the others again, identically
    log = _run(pair, world, run)
    assert any("line 5 is damaged; keeping the 4 rows before it" in line for line in log)
    after = {r["idx"]: r for r in read_jsonl_tolerant(path)}
    assert after == before


def test_damaged_parts_batch_and_outputs_are_recomputed(pair, world, tmp_path):  # noqa: F811
    model = tiny_model("qwen2")
    samples = tiny_samples(2, 4)
    fresh = attribute(model, samples, batch_size=2)
    parts = tmp_path / "parts"
    attribute(model, samples, batch_size=2, work_dir=parts)
    (first, *_) = sorted(parts.glob("batch-*.npz"))
    first.write_bytes(first.read_bytes()[:100])
    log = []
    again = attribute(model, samples, batch_size=2, work_dir=parts, log=log.append)
    assert log == [f"{first} is damaged; recomputing that batch"]
    np.testing.assert_array_equal(again.scores, fresh.scores)
    # a bit-flipped W file of a run: its checksum no longer matches, the stage recomputes it
    run = tmp_path / "run"
    _run(pair, world, run)
    path = layout.attribution(run, "base", "gsm8k", 0.1)
    good = Attribution.load(path).scores
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    log = _run(pair, world, run)
    assert any("damaged" in line and str(path) in line for line in log)
    np.testing.assert_array_equal(Attribution.load(path).scores, good)
    # a damaged selection JSON is recomputed too; a damaged manifest is written anew
    layout.selection(run, "gsm8k", 0.1).write_text("{")
    layout.manifest(run).write_text("{")
    log = _run(pair, world, run)
    assert any("manifest.json is damaged" in line for line in log)
    assert json.loads(layout.manifest(run).read_text())["finished_stage"] == "attribute"


def test_damaged_npz_is_one_line(tmp_path, capsys):
    path = tmp_path / "W.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="not a readable W.npz"):
        Attribution.load(path)


@pytest.mark.parametrize("line, needle", [
    ("3", "a sample is a JSON object"),
    ("null", "a sample is a JSON object"),
    ('{"prompt_ids": [1, true], "answer_ids": [2], "cut_len": 1}', "prompt_ids must be"),
    ('{"prompt_ids": [1], "answer_ids": [2], "cut_len": true}', "cut_len=True"),
    ('{"prompt_ids": [1, 99999], "answer_ids": [2], "cut_len": 1}', "outside the model's vocabulary"),
])
def test_bad_samples_are_one_line(tmp_path, capsys, line, needle):
    model_dir = tmp_path / "model"
    tiny_model("llama", exact=False).save_pretrained(model_dir)
    samples = tmp_path / "s.jsonl"
    samples.write_text(line + "\n")
    code = main(["attribute", "--model", str(model_dir), "--samples", str(samples), "--out", str(tmp_path / "W.npz")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("circuitdiff: error:") and needle in err, err


@pytest.mark.parametrize("device, needle", [("tpu9", "device 'tpu9' is unknown"), ("cuda:3", "CUDA")])
def test_bad_device_is_refused_before_any_work(pair, world, tmp_path, device, needle):  # noqa: F811
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has 4 CUDA devices: cuda:3 exists")
    run = tmp_path / "run"
    with pytest.raises(UserError, match=needle):
        _run(pair, world, run, device=device)
    assert not layout.generations(run, "base", "gsm8k").exists()  # nothing generated


def test_tuned_typo_and_other_tokenizer_are_refused_before_any_work(pair, world, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    with pytest.raises(UserError, match="does not exist"):
        _run(pair, world, run, tuned=str(tmp_path / "no-such-model"))
    assert not layout.generations(run, "base", "gsm8k").exists()
    # a tuned model with another tokenizer (another vocabulary): refused unless allowed
    other = tmp_path / "other"
    from pipeline_helpers import save_tiny_lm

    save_tiny_lm(other, seed=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="tokenizers differ .*vocabulary sizes differ"):
        _run(pair, world, run, tuned=str(other), until="generate")
    assert not layout.generations(run, "base", "gsm8k").exists()
    _run(pair, world, run, tuned=str(other), until="generate", allow_different_tokenizers=True)
    assert layout.generations(run, "tuned", "gsm8k").exists()


def test_unwritable_or_directory_out_is_refused_before_any_work(tmp_path, capsys):
    """`--out` that is a directory, or below a file, fails at once: no model loaded, no .parts left behind."""
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"prompt_ids": [1, 2], "answer_ids": [3], "cut_len": 1}\n')
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(str(tmp_path), "is a directory"), (str(blocker / "W.npz"), "is a file, not a directory")]
    for out, needle in cases:
        code = main(["attribute", "--model", str(tmp_path / "no-model"), "--samples", str(samples), "--out", out])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and "\n" not in err, err
    assert not list(tmp_path.glob("*.parts"))
    code = main(["attribute", "--model", str(tmp_path / "no-model"), "--samples", str(samples), "--out",
                 str(tmp_path / "W.npz"), "--device", "tpu9"])
    assert code == 2 and "device 'tpu9' is unknown" in capsys.readouterr().err
