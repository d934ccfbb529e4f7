"""The offline demo: the packaged GRPO adapter, and the whole demo on a few held-out problems."""

import json

import numpy as np
import pytest
import torch

from circuitdiff.store import layout
from circuitdiff.demo import MAX_NEW_TOKENS, demo, demo_adapter
from circuitdiff.io import read_jsonl_tolerant as read_rows
from circuitdiff.models import load_model

pytestmark = pytest.mark.smollm


def test_packaged_adapter_is_a_small_grpo_lora_of_smollm2_that_changes_the_weights():
    path = demo_adapter()
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert (path / "adapter_model.safetensors").stat().st_size <= 20 * 2**20
    record = json.loads((path / "train.json").read_text())
    assert record["settings"]["algorithm"] == "grpo"
    assert record["settings"]["dataset"] == "arith" and record["settings"]["split"] == "train"
    assert record["settings"]["max_completion_length"] == MAX_NEW_TOKENS
    base = load_model("smollm2-135m-instruct", tokenizer=False).model
    tuned = load_model(str(path), tokenizer=False).model
    w0 = base.model.layers[10].self_attn.q_proj.weight
    w1 = tuned.model.layers[10].self_attn.q_proj.weight
    assert not torch.equal(w0, w1) and (w1 - w0).abs().max() > 1e-4
    # embeddings are not LoRA targets: unchanged
    assert torch.equal(base.model.embed_tokens.weight, tuned.model.embed_tokens.weight)


def test_demo_end_to_end_on_a_few_problems(tmp_path):
    out = tmp_path / "demo"
    # the first 30 problems leave 2 questions that both models answer correctly within the cap and that pass the
    # length filters (40 leave 1): the smallest demo with metrics
    report = demo(out, limit=30, validate_samples=1, intervene_questions=4, progress=False, log=lambda *_: None)
    html = (report / "report.html").read_text(encoding="utf-8")
    for title in ("Task accuracy", "Conventions"):
        assert title in html
    # the accuracy table counts what the generations files hold
    acc = {r["dataset"]: r for r in _csv(report / "accuracy.csv")}
    for role in layout.ROLES:
        rows = read_rows(layout.generations(out, role, "arith"))
        assert len(rows) == 30
        assert float(acc["arith"][role]) == pytest.approx(np.mean([r["correct"] for r in rows]))
        assert all(len(r["answer_ids"]) <= MAX_NEW_TOKENS for r in rows)
    assert layout.validation(out, "tuned", "arith", 0.1).exists()
    assert list(layout.find_interventions(out))
    # the controls: both objectives, own and same text, both scales
    metrics = _csv(report / "metrics.csv")
    assert {(r["objective"], r["text"], r["scale"]) for r in metrics} == {
        (o, t, s) for o in ("nll", "logit") for t in ("own", "base", "tuned") for s in ("unit", "raw")}
    assert "Same text" in html and "Loss and scale" in html


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
