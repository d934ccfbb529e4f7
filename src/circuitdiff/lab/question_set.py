"""The fixed question set of a track: chosen once, reused at every checkpoint (docs/lab.md).

A trajectory is a paired comparison only when every checkpoint is measured on the same
questions, with the same T_cut and the same histogram bins. `choose` picks them from the
graded answers of the starting model and of every checkpoint tracked so far:

1. ``questions``: answered (generated) by the start and every checkpoint;
2. ``all_correct``: the start and every checkpoint answered correctly;
3. ``finished`` (``require_finished``, default on): and every answer ended with EOS;
4. the paper's length rules on the START model's answers: T_bar = mean start length over the
   survivors, keep beta*T_bar <= T_start <= gamma*T_bar (select.select with the start as both
   models, so the delta filter is void), T_cut = max(round(alpha*T_bar), 1) (or the authors'
   rule), and the start's answer must hold T_cut tokens;
5. ``cut``: every checkpoint's answer holds at least T_cut tokens;
6. draw N: random.Random(seed).sample over the survivors in idx order (all when fewer).

With ``text="start"`` (every checkpoint scored on the START's answers) steps 2, 3 and 5 look at the
start only: the checkpoints' answers are not scored, so they need not be correct, finished or long.

The set is written to TRACK/start-{key}/question_set.json with the checkpoints it was chosen
from, and kept until `circuitdiff track --rechoose`. A checkpoint tracked later is measured on
it as it is: its answers are used correct or not, and a question whose answer is shorter than
T_cut is left out for that checkpoint (its result says how many).
"""

from __future__ import annotations

import dataclasses
import random

from circuitdiff.errors import UserError
from circuitdiff.select import SelectionSettings, finished, select
from circuitdiff.store.keys import settings_key

STEPS = ("questions", "all_correct", "finished", "length", "cut", "drawn")
CONVENTION = ("fixed question set: answered correctly (and finished) by the start and every checkpoint it was "
              "chosen from; the paper's length rules, T_bar and T_cut on the start's answers; every checkpoint's "
              "answer holds T_cut tokens; N drawn once with the seed; the same questions, T_cut and raw-scale "
              "histogram range at every checkpoint")
CONVENTION_START = ("fixed question set, every checkpoint scored on the START's answers: answered correctly (and "
                    "finished) by the start; the paper's length rules, T_bar and T_cut on the start's answers; N drawn "
                    "once with the seed; the same questions, tokens, T_cut and raw-scale histogram range at every "
                    "checkpoint")


def choose(start: list[dict], checkpoints: dict[str, list[dict]], sel: SelectionSettings, text: str = "own") -> dict:
    """The fixed set from the graded rows of the start and of each checkpoint (label -> rows); text "start": the
    checkpoints are scored on the start's answers, so only the start's answers are graded and measured."""
    rows = {label: {r["idx"]: r for r in got} for label, got in checkpoints.items()}
    first = {r["idx"]: r for r in start}
    measured = [] if text == "start" else list(rows.values())  # checkpoints whose own answers are scored
    judged = [first, *measured]
    counts: dict[str, int] = {}

    def check(step: str, survivors: list[int]) -> list[int]:
        counts[step] = len(survivors)
        if not survivors:
            trail = ", ".join(f"{k}={v}" for k, v in counts.items())
            raise UserError(f"no question survives the {step} step of the fixed question set ({trail}); track fewer "
                            "checkpoints, use more questions (--limit), raise max_new_tokens, or --keep-unfinished")
        return survivors

    q = check("questions", sorted(set.intersection(*(set(r) for r in [first, *rows.values()]))))
    q = check("all_correct", [i for i in q if all(r[i]["correct"] for r in judged)])
    if sel.require_finished:
        q = [i for i in q if all(finished(r[i]) for r in judged)]
    q = check("finished", q)
    kept = [first[i] for i in q]
    try:
        on_start = select(kept, kept, dataclasses.replace(sel, n_samples=len(kept), require_finished=False))
    except UserError as err:
        raise UserError(f"fixed question set, length rules on the start's answers: {err}") from None
    t_cut = on_start.T_cut
    q = check("length", sorted(on_start.idx))
    q = check("cut", [i for i in q if all(len(r[i]["answer_ids"]) >= t_cut for r in measured)])
    drawn = random.Random(sel.seed).sample(q, min(sel.n_samples, len(q)))
    counts["drawn"] = len(drawn)
    chosen = {"idx": drawn, "T_cut": t_cut, "T_bar": on_start.T_bar, "counts": counts,
              "checkpoints": sorted(checkpoints), "settings": dataclasses.asdict(sel), "text": text,
              "convention": CONVENTION_START if text == "start" else CONVENTION}
    chosen["key"] = settings_key({k: chosen[k] for k in ("idx", "T_cut", "settings")} | ({"text": text} if text != "own" else {}))
    return chosen


def selection_for(qset: dict, rows: list[dict]) -> dict:
    """A run directory's selection file for one checkpoint: the set's questions (in draw order) whose answer in
    `rows` holds T_cut tokens, with the set's T_cut. Its `fixed_set` key names the set; a checkpoint that keeps
    every question gets the same file as the start (so their W files share a key)."""
    by_idx = {r["idx"]: r for r in rows}
    t_cut = qset["T_cut"]
    idx = [i for i in qset["idx"] if i in by_idx and len(by_idx[i]["answer_ids"]) >= t_cut]
    if len(idx) < len(qset["idx"]):
        short = len(qset["idx"]) - len(idx)
        note = f"{short} of the set's {len(qset['idx'])} questions left out: this model's answer is shorter than T_cut"
    else:
        note = ""
    return {"idx": idx, "T_bar": qset["T_bar"], "T_cut": t_cut, "counts": qset["counts"], "fixed_set": qset["key"],
            "note": note, "settings": qset["settings"], "conventions": {"selection": qset["convention"]}}


def n_correct(qset: dict, rows: list[dict]) -> int:
    """How many of the set's questions this model answered correctly."""
    by_idx = {r["idx"]: r for r in rows}
    return sum(1 for i in qset["idx"] if i in by_idx and by_idx[i]["correct"])
