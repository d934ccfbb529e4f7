"""`circuitdiff attribute`: the W.npz interface, bad input, and resuming a killed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle import composed_gated_forward, oracle_scores
from tiny import tiny_model, tiny_samples

from circuitdiff import engine as engine_module
from circuitdiff.attribute import Attribution, attribute
from circuitdiff.cli import main
from circuitdiff.models.adapters import adapter_for


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_model("llama", dtype=torch.float32, exact=False)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def _write_samples(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def test_cli_writes_the_public_npz(tiny_dir, tmp_path, capsys):
    model, model_dir = tiny_dir
    samples = tiny_samples(1, 3)
    out = tmp_path / "W.npz"
    code = main(["attribute", "--model", str(model_dir), "--samples", str(_write_samples(tmp_path / "s.jsonl", samples)),
                 "--granularity", "qkv", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    data = np.load(out)
    assert {"scores", "src_names", "dst_names", "edge_mask"} <= set(data.files)
    assert data["scores"].dtype == np.float32 and data["scores"].shape == (3, 3 * 4 + 1, 1 + 2 * 3)
    assert list(data["src_names"]) == ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    assert list(data["dst_names"][:4]) == ["attn.0.q", "attn.0.k", "attn.0.v", "mlp.0"]
    assert data["dst_names"][-1] == "logits"
    assert data["edge_mask"].dtype == bool and data["edge_mask"].sum() == 4 * 9 + 3 * 3 + 1
    assert "granularity=qkv" in capsys.readouterr().out
    assert not (tmp_path / "W.npz.parts").exists()
    # block scores from the CLI against the model's own gated composition (float32 storage)
    main(["attribute", "--model", str(model_dir), "--samples", str(tmp_path / "s.jsonl"), "--out", str(out)])
    loaded = Attribution.load(out)
    for k, sample in enumerate(samples):
        expected, _ = oracle_scores(composed_gated_forward, model, adapter_for(model), [sample])
        np.testing.assert_allclose(loaded.scores[k], expected.numpy(), atol=2e-6 * np.abs(expected.numpy()).max())


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    code = main(["attribute", "--model", "smollm2-135m-instruct", "--samples", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "W.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("circuitdiff: error:") and "does not exist" in err and "\n" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1, 2], "answer_ids": [3], "cut_len": 1}\n{"prompt_ids": [1], "answer_ids": [3]\n')
    code = main(["attribute", "--model", "smollm2-135m-instruct", "--samples", str(bad), "--out", str(tmp_path / "W.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "line 2: not valid JSON" in err


def test_killed_run_resumes_without_redoing_batches(tmp_path, monkeypatch):
    model = tiny_model("qwen2")
    samples = tiny_samples(2, 5)
    fresh = attribute(model, samples, batch_size=2)
    calls = {"n": 0}
    real_scores = engine_module.EdgeAttributor.scores

    def dies_on_second_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_scores(self, batch)

    monkeypatch.setattr(engine_module.EdgeAttributor, "scores", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        attribute(model, samples, batch_size=2, work_dir=tmp_path / "parts")
    assert len(list((tmp_path / "parts").glob("batch-*.npz"))) == 1
    assert not list((tmp_path / "parts").glob(".*tmp"))  # no half-written file left behind

    calls["n"] = 10  # from here on nothing fails; count the batches actually computed
    resumed = attribute(model, samples, batch_size=2, work_dir=tmp_path / "parts")
    assert calls["n"] == 10 + 2  # 3 batches, the first one read back from disk
    np.testing.assert_array_equal(resumed.scores, fresh.scores)
    np.testing.assert_array_equal(resumed.loss, fresh.loss)


def test_attribution_roundtrip(tmp_path):
    result = attribute(tiny_model("mistral"), tiny_samples(3, 2), granularity="head", batch_size=2)
    loaded = Attribution.load(result.save(tmp_path / "W.npz"))
    np.testing.assert_allclose(loaded.scores, result.scores.astype(np.float32))
    assert loaded.src_names == result.src_names and loaded.dst_names == result.dst_names
    assert loaded.granularity == "head" and loaded.meta["granularity"] == "head"
    assert np.array_equal(loaded.edge_mask, result.edge_mask)


def test_package_attribute_is_the_function_after_the_module_is_imported(tiny_dir):
    """`circuitdiff.attribute(...)` (the README's API) works although this file imported the module of that name
    (which rebinds the package attribute to the module)."""
    import circuitdiff
    import circuitdiff.attribute as module

    assert circuitdiff.attribute is module  # what the import system leaves on the package
    model, model_dir = tiny_dir
    samples = tiny_samples(1, 2)
    via_package = circuitdiff.attribute(str(model_dir), samples)
    direct = attribute(str(model_dir), samples)
    np.testing.assert_array_equal(via_package.scores, direct.scores)
