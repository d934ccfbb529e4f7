"""Sample selection: each filter against a direct numpy re-computation on synthetic rows."""

import random

import numpy as np
import pytest

from circuitdiff.errors import UserError
from circuitdiff.select import SelectionSettings, select


def rows_from(lengths, correct, start=0, finished=None):
    finished = [True] * len(lengths) if finished is None else finished
    return [{"idx": start + i, "answer_ids": [7] * n, "correct": c, "stop": "eos" if f else "length"}
            for i, (n, c, f) in enumerate(zip(lengths, correct, finished))]


def reference(tb, tt, cb, ct, s: SelectionSettings, fb=None, ft=None):
    """The rules of docs/method.md section 6 written directly with numpy masks."""
    tb, tt, cb, ct = map(np.asarray, (tb, tt, cb, ct))
    fb = np.ones_like(cb) if fb is None else np.asarray(fb)
    ft = np.ones_like(ct) if ft is None else np.asarray(ft)
    q = cb & ct & ((fb & ft) if s.require_finished else True)
    t_bar = ((tb[q] + tt[q]) / 2).mean()
    if s.length_rule == "paper":
        length = (tb >= s.beta * t_bar) & (tt <= s.gamma * t_bar)
    else:
        m = (tb + tt) / 2
        length = (m >= s.beta * t_bar) & (m <= s.gamma * t_bar)
    delta = np.abs(tb - tt) / ((tb + tt) / 2) < s.delta
    if s.cut_rule == "paper":
        cut = max(int(np.floor(s.alpha * t_bar + 0.5)), 1)
    else:
        cut = max(int(s.alpha * min(tb[q].mean(), tt[q].mean())), 1)
    keep = q & length & delta & (tb >= cut) & (tt >= cut)
    return t_bar, cut, q, q & length, q & length & delta, keep


@pytest.mark.parametrize("require_finished", [True, False])
@pytest.mark.parametrize("length_rule", ["paper", "authors"])
@pytest.mark.parametrize("cut_rule", ["paper", "authors"])
@pytest.mark.parametrize("alpha", [0.03, 0.5])
def test_filters_match_reference(length_rule, cut_rule, alpha, require_finished):
    rng = np.random.default_rng(3)
    n = 400
    tb = rng.integers(1, 400, n)
    tt = np.clip((tb * rng.uniform(0.3, 2.0, n)).astype(int), 1, None)
    cb, ct = rng.random(n) < 0.7, rng.random(n) < 0.6
    fb, ft = rng.random(n) < 0.9, rng.random(n) < 0.85  # some answers were cut at the token cap
    s = SelectionSettings(alpha=alpha, n_samples=30, seed=5, length_rule=length_rule, cut_rule=cut_rule,
                          require_finished=require_finished)
    sel = select(rows_from(tb, cb, finished=fb), rows_from(tt, ct, finished=ft), s)
    t_bar, cut, q, after_len, after_delta, keep = reference(tb, tt, cb, ct, s, fb, ft)
    assert sel.T_bar == pytest.approx(t_bar)
    assert sel.T_cut == cut
    assert sel.counts == {"questions": n, "both_correct": (cb & ct).sum(), "finished": q.sum(), "length": after_len.sum(),
                          "delta": after_delta.sum(), "cut": keep.sum(), "drawn": min(30, keep.sum())}
    assert sel.removed["finished"] == ((cb & ct).sum() - q.sum() if require_finished else 0)
    assert sel.removed["length"] == q.sum() - after_len.sum()
    survivors = set(np.flatnonzero(keep).tolist())
    assert len(sel.idx) == len(set(sel.idx)) == 30 and set(sel.idx) <= survivors
    # the draw: random.Random(seed).sample over survivors in idx order
    assert sel.idx == random.Random(5).sample(sorted(survivors), 30)
    # every filter removed something in this mix (so each one is really exercised)
    assert all(v > 0 for k, v in sel.removed.items() if k in ("both_correct", "length", "delta"))


def test_rules_differ_where_they_should():
    # T_bar = 100; the base answer is short (40 < beta*T_bar) but the mean (70) is within bounds
    base = rows_from([40, 100, 100], [True] * 3)
    tuned = rows_from([100, 100, 100], [True] * 3)
    t_bar = (70 + 100 + 100) / 3
    paper = select(base, tuned, SelectionSettings(alpha=0.1, delta=10))
    authors = select(base, tuned, SelectionSettings(alpha=0.1, delta=10, length_rule="authors"))
    assert 0 not in paper.idx and 0 in authors.idx
    assert paper.T_bar == pytest.approx(t_bar)
    # cut rules: paper round(0.1*90) = 9; authors int(0.1*min(80, 100)) = 8
    assert paper.T_cut == 9
    assert select(base, tuned, SelectionSettings(alpha=0.1, delta=10, cut_rule="authors")).T_cut == 8


def test_delta_is_strict_and_relative_to_the_mean():
    # |60-40| / 50 = 0.4: kept for delta 0.5, removed for delta 0.4 (strict <)
    base, tuned = rows_from([60, 50], [True, True]), rows_from([40, 50], [True, True])
    assert sorted(select(base, tuned, SelectionSettings(alpha=0.1, delta=0.5)).idx) == [0, 1]
    assert select(base, tuned, SelectionSettings(alpha=0.1, delta=0.4)).idx == [1]


def test_only_questions_present_in_both_count():
    base = rows_from([10, 10, 10], [True] * 3)
    tuned = rows_from([10, 10], [True] * 2, start=1)
    sel = select(base, tuned, SelectionSettings(alpha=0.5))
    assert sel.counts["questions"] == 2 and sorted(sel.idx) == [1, 2]


def test_fewer_survivors_than_n_takes_all_and_seed_changes_order():
    base = rows_from([10] * 5, [True] * 5)
    a = select(base, base, SelectionSettings(alpha=0.1, n_samples=100, seed=0))
    assert sorted(a.idx) == list(range(5)) and a.counts["drawn"] == 5
    many = rows_from([10] * 50, [True] * 50)
    x = select(many, many, SelectionSettings(alpha=0.1, n_samples=10, seed=0)).idx
    y = select(many, many, SelectionSettings(alpha=0.1, n_samples=10, seed=1)).idx
    assert x != y and x == select(many, many, SelectionSettings(alpha=0.1, n_samples=10, seed=0)).idx


@pytest.mark.parametrize(
    "base, tuned, settings, step",
    [
        (rows_from([10, 10], [True, False]), rows_from([10, 10], [False, True]), dict(alpha=0.1), "both_correct"),
        (rows_from([10, 100], [True, True]), rows_from([300, 300], [True, True]), dict(alpha=0.1, delta=10), "length"),
        (rows_from([10, 100], [True, True]), rows_from([30, 300], [True, True]),
         dict(alpha=0.1, length_rule="authors", beta=0, gamma=100), "delta"),
        # T_bar = 1.5, alpha = 1 -> T_cut = 2 (half rounds up) > the base's single token
        (rows_from([1, 1], [True, True]), rows_from([2, 2], [True, True]),
         dict(alpha=1.0, delta=10, beta=0, gamma=100), "cut"),
    ],
)
def test_empty_selection_names_the_filter(base, tuned, settings, step):
    with pytest.raises(UserError, match=f"survives the {step} filter on gsm8k"):
        select(base, tuned, SelectionSettings(**settings), dataset="gsm8k")


def test_bad_settings():
    with pytest.raises(UserError, match="length_rule"):
        SelectionSettings(alpha=0.1, length_rule="mine")
    with pytest.raises(UserError, match="cut_rule"):
        SelectionSettings(alpha=0.1, cut_rule="mine")
    with pytest.raises(UserError, match="alpha"):
        SelectionSettings(alpha=0)
