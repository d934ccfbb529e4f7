"""Sample selection for one model pair on one dataset (docs/method.md, section 6).

Given the graded generations of both models, keep the comparable questions:

1. ``both_correct``: the questions both models answered correctly.
   ``finished`` (``require_finished``, default on): and both answers ended by themselves (EOS),
   not at the token cap: a cut answer's length is the cap, not its length (Q).
2. ``T_bar`` = mean over Q of (T_base + T_tuned) / 2, with T the answer length in tokens
   (generated tokens before EOS).
3. length filter, two rules:
   - ``length_rule = "paper"`` (the paper's text): T_base >= beta*T_bar and T_tuned <= gamma*T_bar;
   - ``length_rule = "authors"`` (the authors' code): beta*T_bar <= (T_base + T_tuned)/2 <= gamma*T_bar.
4. ``delta`` filter: |T_base - T_tuned| / ((T_base + T_tuned)/2) < delta.
5. T_cut, two rules:
   - ``cut_rule = "paper"``: T_cut = max(round(alpha * T_bar), 1), rounding half up;
   - ``cut_rule = "authors"``: T_cut = max(int(alpha * min(mean_base_len, mean_tuned_len)), 1),
     the means taken over Q (like T_bar).
6. ``cut`` filter: both answers must hold at least T_cut tokens (the loss reads the first T_cut).
7. Draw N questions at random (``random.Random(seed).sample`` over the survivors in idx order);
   all of them when fewer than N survive. The same questions for both models.

Each filter's count is recorded; an empty result raises UserError naming the filter that emptied it.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from circuitdiff.errors import UserError

LENGTH_RULES = ("paper", "authors")
CUT_RULES = ("paper", "authors")


@dataclass(frozen=True)
class SelectionSettings:
    alpha: float
    require_finished: bool = True
    beta: float = 0.5
    gamma: float = 1.5
    delta: float = 0.5
    n_samples: int = 100
    seed: int = 0
    length_rule: str = "paper"
    cut_rule: str = "paper"

    def __post_init__(self):
        if self.length_rule not in LENGTH_RULES:
            raise UserError(f"length_rule {self.length_rule!r} is unknown; use one of {', '.join(LENGTH_RULES)}")
        if self.cut_rule not in CUT_RULES:
            raise UserError(f"cut_rule {self.cut_rule!r} is unknown; use one of {', '.join(CUT_RULES)}")
        if not 0 < self.alpha <= 1:
            raise UserError(f"alpha={self.alpha} must lie in (0, 1]")
        if self.n_samples < 1:
            raise UserError(f"n_samples={self.n_samples} must be at least 1")


@dataclass
class Selection:
    idx: list[int]  # the chosen questions, in draw order
    T_bar: float
    T_cut: int
    mean_base_len: float
    mean_tuned_len: float
    counts: dict[str, int]  # questions left after each step, in order
    removed: dict[str, int]  # questions each filter removed
    settings: dict = field(default_factory=dict)
    conventions: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


STEPS = ("questions", "both_correct", "finished", "length", "delta", "cut", "drawn")
CONVENTIONS = {
    "finished": "with require_finished: both answers ended with EOS, not at max_new_tokens (a row's stop == 'eos')",
    "answer_length": "generated tokens before EOS (len(answer_ids))",
    "T_bar": "mean over the both-correct (and finished) questions of (T_base + T_tuned) / 2",
    "length_rule.paper": "T_base >= beta*T_bar and T_tuned <= gamma*T_bar",
    "length_rule.authors": "beta*T_bar <= (T_base + T_tuned)/2 <= gamma*T_bar",
    "delta": "|T_base - T_tuned| / ((T_base + T_tuned)/2) < delta",
    "cut_rule.paper": "T_cut = max(floor(alpha*T_bar + 0.5), 1) (round half up)",
    "cut_rule.authors": "T_cut = max(int(alpha*min(mean_base_len, mean_tuned_len)), 1), means over the both-correct "
                        "(and finished) questions",
    "cut_filter": "both answers hold at least T_cut tokens",
    "draw": "random.Random(seed).sample(survivors in idx order, min(N, survivors))",
}
_FIXES = {
    "both_correct": "no question was answered correctly by both models; use more questions, an easier dataset, "
                    "or a larger max_new_tokens",
    "finished": "every both-correct question has an answer cut at max_new_tokens; raise max_new_tokens "
                "(or selection.require_finished: false)",
    "length": "raise gamma / lower beta, or try length_rule: authors",
    "delta": "raise delta",
    "cut": "lower alpha",
}


def finished(row: dict) -> bool:
    """The answer ended with EOS, not at the token cap (rows without a `stop` field count as finished)."""
    return row.get("stop", "eos") == "eos"


def select(base_rows: list[dict], tuned_rows: list[dict], settings: SelectionSettings,
           dataset: str = "") -> Selection:
    """Choose the questions for one dataset and alpha from the two models' graded rows."""
    base = {r["idx"]: r for r in base_rows}
    tuned = {r["idx"]: r for r in tuned_rows}
    common = sorted(set(base) & set(tuned))
    counts = {"questions": len(common)}

    def length(rows, i):
        return len(rows[i]["answer_ids"])

    def check(step: str, survivors: list[int]) -> None:
        counts[step] = len(survivors)
        if not survivors:
            trail = ", ".join(f"{k}={v}" for k, v in counts.items())
            where = f" on {dataset}" if dataset else ""
            raise UserError(f"no question survives the {step} filter{where} (alpha={settings.alpha}; {trail}); "
                            f"{_FIXES[step]}")

    q = [i for i in common if base[i]["correct"] and tuned[i]["correct"]]
    check("both_correct", q)
    if settings.require_finished:
        q = [i for i in q if finished(base[i]) and finished(tuned[i])]
    check("finished", q)
    tb = {i: length(base, i) for i in q}
    tt = {i: length(tuned, i) for i in q}
    mean_base = sum(tb.values()) / len(q)
    mean_tuned = sum(tt.values()) / len(q)
    t_bar = sum((tb[i] + tt[i]) / 2 for i in q) / len(q)

    lo, hi = settings.beta * t_bar, settings.gamma * t_bar
    if settings.length_rule == "paper":
        kept = [i for i in q if tb[i] >= lo and tt[i] <= hi]
    else:
        kept = [i for i in q if lo <= (tb[i] + tt[i]) / 2 <= hi]
    check("length", kept)

    kept = [i for i in kept if (tb[i] + tt[i]) > 0 and abs(tb[i] - tt[i]) / ((tb[i] + tt[i]) / 2) < settings.delta]
    check("delta", kept)

    if settings.cut_rule == "paper":
        t_cut = max(math.floor(settings.alpha * t_bar + 0.5), 1)
    else:
        t_cut = max(int(settings.alpha * min(mean_base, mean_tuned)), 1)
    kept = [i for i in kept if tb[i] >= t_cut and tt[i] >= t_cut]
    check("cut", kept)

    chosen = random.Random(settings.seed).sample(kept, min(settings.n_samples, len(kept)))
    counts["drawn"] = len(chosen)
    removed = {step: counts[prev] - counts[step] for prev, step in zip(STEPS, STEPS[1:])}
    return Selection(
        idx=chosen,
        T_bar=t_bar,
        T_cut=t_cut,
        mean_base_len=mean_base,
        mean_tuned_len=mean_tuned,
        counts=counts,
        removed=removed,
        settings=asdict(settings),
        conventions=dict(CONVENTIONS),
    )
