"""The report's task-accuracy table: paired by question idx, counted independently here."""

import json

import numpy as np
import pytest

from circuitdiff.report.accuracy import accuracy_rows


def write_rows(path, correct_by_idx):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for idx, ok in correct_by_idx.items():
            f.write(json.dumps({"idx": idx, "gold": "1", "prompt_ids": [3], "answer_ids": [1, 2], "answer_text": "1",
                                "correct": ok}) + "\n")


def test_accuracy_rows_pair_by_idx_and_match_hand_counts(tmp_path):
    rng = np.random.default_rng(0)
    base = {i: bool(rng.random() < 0.3) for i in range(50)}
    tuned = {i: bool(rng.random() < 0.6) for i in range(50)}
    # tuned rows in another order, plus a question only base answered (not paired, not counted)
    write_rows(tmp_path / "generations" / "base" / "arith.jsonl", {**base, 99: True})
    write_rows(tmp_path / "generations" / "tuned" / "arith.jsonl", dict(reversed(list(tuned.items()))))
    write_rows(tmp_path / "generations" / "base" / "gsm8k.jsonl", base)  # no tuned file: skipped
    (row,) = accuracy_rows(tmp_path, n_boot=500)
    b = np.array([base[i] for i in range(50)])
    t = np.array([tuned[i] for i in range(50)])
    assert row["dataset"] == "arith" and row["n_questions"] == 50
    assert row["base"] == pytest.approx(b.mean()) and row["tuned"] == pytest.approx(t.mean())
    assert row["diff"] == pytest.approx(t.mean() - b.mean())
    assert (row["only_base"], row["only_tuned"]) == (int((b & ~t).sum()), int((t & ~b).sum()))
    assert row["base_ci_low"] < row["base"] < row["base_ci_high"]
    assert row["diff_ci_low"] <= row["diff"] <= row["diff_ci_high"]
