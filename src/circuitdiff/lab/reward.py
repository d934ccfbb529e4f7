"""The training reward (docs/method.md, section 11): +3 correct, -0.5 completely wrong, partial credit between.

    reward = 3                                    the graded answer is correct (circuitdiff.grade)
    reward = -0.5 + 2.0 * max(0, 1 - dev)         a number that is wrong, dev = |pred - gold| / |gold|
                                                  (|pred - gold| when gold = 0): from 1.5 just off
                                                  the gold down to -0.5 at dev >= 1
    reward = -0.5                                 no answer, or not a number

Partial credit stays below 1.5 so that a near miss never earns what a correct answer earns.
The answer is extracted like everywhere else: last \\boxed{}, else "the answer is", else last number.
"""

from __future__ import annotations

from circuitdiff.grade import grade, relative_deviation

CORRECT = 3.0
WRONG = -0.5
PARTIAL_MAX = 1.5
CONVENTION = (f"reward: {CORRECT:+g} correct; {WRONG:+g} no/non-numeric answer; "
              f"{WRONG:+g} + {PARTIAL_MAX - WRONG:g}*max(0, 1 - |pred-gold|/|gold|) for a wrong number")


def reward(text: str, gold: str, kind: str = "numeric") -> float:
    """The reward of one completion `text` for a problem with answer `gold`."""
    graded = grade(text, gold, kind)
    if graded.correct:
        return CORRECT
    deviation = relative_deviation(graded.prediction, gold)
    if deviation is None:
        return WRONG
    return WRONG + (PARTIAL_MAX - WRONG) * max(0.0, 1.0 - deviation)


def completion_text(completion) -> str:
    """TRL hands completions as text, or as a list of chat messages: the text either way."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def trl_reward(completions, gold, kind, **_) -> list[float]:
    """The reward in TRL's form: one float per completion; `gold` and `kind` are dataset columns."""
    return [reward(completion_text(c), g, k) for c, g, k in zip(completions, gold, kind)]
