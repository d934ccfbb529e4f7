"""The pipeline on the real SmolLM2-135M-Instruct (offline): chat prompt, EOS, grading, selection, attribution."""

import numpy as np
import pytest

from circuitdiff.store import layout
from circuitdiff.attribute import Attribution
from circuitdiff.config import parse_config
from circuitdiff.io import read_jsonl_tolerant as read_rows
from circuitdiff.io import read_json
from circuitdiff.models import load_model
from circuitdiff.pipeline import RunContext, run_stages
from pipeline_helpers import write_gsm8k_file

pytestmark = pytest.mark.smollm

QUESTIONS = ["What is 2 plus 3?", "What is 10 minus 4?", "What is 3 times 3?"]
GOLDS = ["5", "6", "9"]


def test_smollm2_self_pair_end_to_end(tmp_path):
    data = write_gsm8k_file(tmp_path / "easy.jsonl", GOLDS, QUESTIONS)
    cfg = parse_config({
        "base": "smollm2-135m-instruct", "tuned": "smollm2-135m-instruct",
        "datasets": [{"name": "gsm8k", "source": str(data)}], "alphas": [0.1],
        "max_new_tokens": 40, "gen_batch_size": 4, "attr_batch_size": 4, "instruction": "",
    })
    run = tmp_path / "run"
    log = []
    run_stages(RunContext(cfg, run, progress=False, log=log.append))
    rows = sorted(read_rows(layout.generations(run, "base", "gsm8k")), key=lambda r: r["idx"])
    tok = load_model("smollm2-135m-instruct").tokenizer
    for row in rows:
        prompt = tok.decode(row["prompt_ids"])
        assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
        assert row["question"] in prompt
        assert tok.eos_token_id not in row["answer_ids"]
        assert row["answer_text"] == tok.decode(row["answer_ids"], skip_special_tokens=True)
    assert sum(r["stop"] == "eos" for r in rows) >= 1
    correct = {r["idx"] for r in rows if r["correct"]}
    assert correct, f"SmolLM2 solved none of the easy questions: {[r['answer_text'] for r in rows]}"
    sel = read_json(layout.selection(run, "gsm8k", 0.1))
    assert set(sel["idx"]) == correct  # a self-pair keeps every both-correct question
    for role in layout.ROLES:
        W = Attribution.load(layout.attribution(run, role, "gsm8k", 0.1))
        assert W.scores.shape == (len(correct), 61, 61)
        assert np.isfinite(W.scores).all() and np.count_nonzero(W.scores[:, W.edge_mask]) > 0
        assert not W.scores[:, ~W.edge_mask].any()  # impossible edges stay 0
    np.testing.assert_array_equal(Attribution.load(layout.attribution(run, "base", "gsm8k", 0.1)).scores,
                                  Attribution.load(layout.attribution(run, "tuned", "gsm8k", 0.1)).scores)
