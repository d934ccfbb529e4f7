"""The training reward (docs/method.md, section 11): +3 correct, -0.5 completely wrong, partial credit between.

    reward = 3                                    the graded answer is correct (circuitdiff.grade)
    reward = -0.5 + 2.0 * max(0, 1 - dev)         a number that is wrong, dev = |pred - gold| / |gold|
                                                  (|pred - gold| when gold = 0): from 1.5 just off
                                                  the gold down to -0.5 at dev >= 1
    reward = -0.5                                 no answer, not a number, or truncated

Partial credit stays below 1.5 so that a near miss never earns what a correct answer earns.
The reward shares the grader (circuitdiff.grade, rule "strict"): the same extraction, integers
matched exactly, and a completion cut at the token cap without a non-empty \\boxed{} has no
answer (-0.5). TRL hands the completion's token ids; a completion is finished when it holds an
EOS id.
"""

from __future__ import annotations

from circuitdiff.grade import grade, relative_deviation

CORRECT = 3.0
WRONG = -0.5
PARTIAL_MAX = 1.5
CONVENTION = (f"reward: {CORRECT:+g} correct (circuitdiff.grade, strict); {WRONG:+g} no/non-numeric/truncated answer; "
              f"{WRONG:+g} + {PARTIAL_MAX - WRONG:g}*max(0, 1 - |pred-gold|/|gold|) for a wrong number")


def reward(text: str, gold: str, kind: str = "numeric", finished: bool = True, truncated_rule: str = "strict") -> float:
    """The reward of one completion `text` for a problem with answer `gold`; finished: it ended with EOS.

    truncated_rule: the grader's rule for an answer cut at the cap without a \\boxed{} answer ("strict":
    no answer, -0.5; "lenient": graded, and partly credited, by its text)."""
    graded = grade(text, gold, kind, finished=finished, truncated_rule=truncated_rule)
    if graded.correct:
        return CORRECT
    if graded.truncated and truncated_rule == "strict":
        return WRONG
    deviation = relative_deviation(graded.prediction, gold)
    if deviation is None:
        return WRONG
    return WRONG + (PARTIAL_MAX - WRONG) * max(0.0, 1.0 - deviation)


def completion_text(completion) -> str:
    """TRL hands completions as text, or as a list of chat messages: the text either way."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def make_trl_reward(eos_ids, truncated_rule: str = "strict"):
    """The reward in TRL's form (one float per completion; `gold` and `kind` are dataset columns), given the
    tokenizer's EOS ids: a completion whose ids hold none of them was cut at the cap."""
    eos = {int(e) for e in eos_ids}

    def circuitdiff_reward(completions, gold, kind, completion_ids=None, **_) -> list[float]:
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        return [reward(completion_text(c), g, k, finished=True if i is None else bool(eos & set(i)),
                       truncated_rule=truncated_rule)
                for c, g, k, i in zip(completions, gold, kind, ids)]

    return circuitdiff_reward
