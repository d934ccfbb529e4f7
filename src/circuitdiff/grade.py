"""Grade a model's answer against the gold answer.

Conventions (the authors' evaluation, made strict; docs/method.md, section 9):
- Answer extraction: the content of the LAST non-empty ``\\boxed{...}`` (or ``\\fbox{...}``,
  nested braces handled); else what follows the last "the answer is"; else the last number
  in the text. An empty ``\\boxed{}`` holds no answer: extraction ignores it and reads the
  rest of the text ("The answer is within \\boxed{}." gives no answer-is phrase, so the last
  number decides). `extract_answer` returns None when none of the three is found.
- Numbers (`parse_number`: thousands commas, ``$``, ``%``, trailing units, fractions,
  ``\\frac``): an integer gold must be matched exactly (17999 is not 18000); a non-integer
  gold within relative tolerance `REL_TOL` = 1e-6 (rounding in the last printed digits).
- ``kind = "numeric"`` (GSM8K-style gold): numbers as above; an answer that is not a number
  is compared as a normalised string.
- ``kind = "math"`` (MATH-style gold): numbers as above when both sides are numbers,
  else normalised string equality, else the symbolic check of math-verify.
- Truncation: an answer stopped by the token cap (``finished=False``) with no non-empty
  ``\\boxed{}`` is ``truncated``: it has no final answer, and it is never correct under the
  default rule ``strict``. ``lenient`` grades it like any other text (the last number counts),
  the authors' evaluation.
- Accuracy: k/n with a Wilson score interval (95%, z = 1.959964).

The small functions here (`extract_answer`, `parse_number`, `is_correct`,
`relative_deviation`) are public so that the lab's reward function can reuse them.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

REL_TOL = 1e-6  # non-integer golds; integer golds match exactly
GRADER_VERSION = "2"  # bump when a change here can change a grade: a run re-grades its rows
TRUNCATION_RULES = ("strict", "lenient")
Z_95 = 1.959963984540054
KINDS = ("numeric", "math")
GRADING_CONVENTIONS = {
    "extraction": "last non-empty \\boxed{} (or \\fbox{}), else text after the last 'the answer is', else the last "
                  "number; an empty \\boxed{} is ignored",
    "numeric": f"both sides read as numbers (thousands commas, $, %, units, fractions dropped/parsed); an integer gold "
               f"must match exactly, a non-integer gold within relative tolerance {REL_TOL}",
    "math": "numbers as above, else normalised string equality, else math-verify verify(gold, prediction)",
    "truncated": "an answer stopped by the token cap without a non-empty \\boxed{} has no final answer: never correct "
                 "under the rule 'strict' (default); 'lenient' grades its text like any other",
    "accuracy_interval": "Wilson score interval, 95%",
    "grader_version": GRADER_VERSION,
}

# ---------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
# a number: thousands groups with commas, or plain digits; optional decimals; a sign
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or of ``\\boxed 5``.

    An empty box gives "" (callers treat it as no answer)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for pos in range(start, len(text)):
                if text[pos] == "{":
                    depth += 1
                elif text[pos] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : pos].strip()
            continue  # unbalanced (answer cut off): try an earlier box
        match = re.match(r"[^\s$]+", text[start:])  # "\boxed 5$"
        if match:
            return match.group(0).strip()
    return None


_EMPTY_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{\s*\}")
_CONNECTIVES = {"within", "in", "inside", "as", "below", "above", "here"}  # "the answer is within \boxed{}"


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip()
    rest = rest.split("\n", 1)[0].strip()
    # stop at the end of the sentence: a period followed by a space or the end, not a decimal point
    rest = re.split(r"\.(?=\s|$)", rest, maxsplit=1)[0]
    rest = rest.strip().strip("$").strip()
    if rest.lower().strip(" .,:;") in _CONNECTIVES:  # the phrase pointed at a box that held nothing
        return None
    return rest or None


def last_number(text: str) -> str | None:
    """The last number in `text` (a fraction a/b counts as one number), thousands commas removed."""
    matches = list(re.finditer(r"(" + _NUMBER.pattern + r")(?:\s*/\s*(" + _NUMBER.pattern + r"))?", text))
    if not matches:
        return None
    m = matches[-1]
    number = m.group(1).replace(",", "")
    if m.group(2):
        number += "/" + m.group(2).replace(",", "")
    return number


def extract_answer(text: str) -> str | None:
    """The model's final answer: last non-empty \\boxed{}, else "the answer is ...", else the last number."""
    if text is None:
        return None
    text = _EMPTY_BOX.sub(" ", text)  # an empty box holds no answer
    for extractor in (extract_boxed, _after_answer_is, last_number):
        answer = extractor(text)
        if answer:
            return answer
    return None


# ---------------------------------------------------------------- numbers

_LATEX_NOISE = [
    (re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}"), r" \1 "),
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\(?:left|right|displaystyle|!|,|;|:|quad|qquad)"), " "),
    (re.compile(r"\^\s*\{?\\circ\}?|\\circ|\\degree"), ""),
    (re.compile(r"\\%|%"), ""),
    (re.compile(r"\\\$|\$"), ""),
    (re.compile(r"\\cdot|\\times"), "*"),
    (re.compile(r"~"), " "),
]
_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_FRAC = re.compile(r"(-?)\s*\\frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_FRAC_SHORT = re.compile(r"(-?)\s*\\frac\s*(\d)\s*(\d)")  # \frac12
_SLASH = re.compile(r"([+-]?[\d.]+)\s*/\s*([+-]?[\d.]+)")
_SCI = re.compile(r"([+-]?[\d.]+)\s*\*\s*10\s*\^\s*\{?\s*([+-]?\d+)\s*\}?")
_MIXED = re.compile(r"(-?)(\d+)\s*\\frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_LEADING_NUMBER = re.compile(r"^([+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?)\s*([A-Za-z][A-Za-z\s.^2-3]*)?$")


def _clean(s: str) -> str:
    s = s.strip()
    for pattern, repl in _LATEX_NOISE:
        s = pattern.sub(repl, s)
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    s = s.strip()
    while s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        s = s[1:-1].strip()
    s = re.sub(r"\s+", " ", s)
    s = s.rstrip(".").strip()
    if s.startswith("(") and s.endswith(")") and s.count("(") == 1:
        s = s[1:-1].strip()
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _plain(s: str) -> float | None:
    s = s.replace(" ", "")
    if _PLAIN.fullmatch(s):
        return float(s)
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def parse_number(s: str | None) -> float | None:
    """Read `s` as one number, or None.

    Accepts: ``1,234.5`` (thousands commas), ``$18``, ``\\$18.00``, ``25\\%``, ``18 dollars``
    and ``5 \\text{ cm}`` (trailing unit words), ``3/4``, ``\\frac{3}{4}``, ``\\dfrac34``,
    ``2\\frac{1}{2}`` (a mixed number), ``1.5 \\times 10^{3}``, ``x = 5``. Refuses anything
    that holds more than one number (``(45,2)``, ``1, 2``) or symbols (``2\\sqrt{3}``).
    """
    if s is None:
        return None
    s = _clean(str(s))
    if not s:
        return None
    if re.fullmatch(r"[A-Za-z]\w*\s*=.*", s):  # "x = 5": the right-hand side
        s = s.split("=", 1)[1].strip()
    value = _plain(s)
    if value is not None:
        return value
    if re.fullmatch(r"-\s*\(.*\)", s):  # "-(1/3)"
        inner = parse_number(s.lstrip("-").strip()[1:-1])
        return None if inner is None else -inner
    m = _MIXED.fullmatch(s)
    if m:
        whole, num, den = float(m.group(2)), float(m.group(3)), float(m.group(4))
        if den == 0:
            return None
        value = whole + num / den
        return -value if m.group(1) else value
    for pattern in (_FRAC, _FRAC_SHORT):
        m = pattern.fullmatch(s)
        if m:
            value = _ratio(parse_number(m.group(2)), parse_number(m.group(3)))
            return None if value is None else (-value if m.group(1) else value)
    m = _SLASH.fullmatch(s)
    if m:
        return _ratio(_plain(m.group(1)), _plain(m.group(2)))
    m = _SCI.fullmatch(s)
    if m:
        mantissa = _plain(m.group(1))
        return None if mantissa is None else mantissa * 10.0 ** int(m.group(2))
    m = _LEADING_NUMBER.fullmatch(s)  # "18 dollars", "5 cm", "3/4 cup"
    if m and m.group(2):
        return parse_number(m.group(1))
    return None


def numbers_equal(pred: float, gold: float, rel_tol: float = REL_TOL) -> bool:
    """An integer gold must be matched exactly; a non-integer gold within relative tolerance `rel_tol`."""
    if math.isfinite(gold) and gold == int(gold):
        return pred == gold
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=0.0)


def relative_deviation(pred: str | None, gold: str) -> float | None:
    """|pred - gold| / |gold| read as numbers (|pred - gold| when gold is 0); None if either is not a number."""
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return None
    return abs(p - g) / abs(g) if g != 0 else abs(p - g)


# ---------------------------------------------------------------- equality

def normalize_text(s: str) -> str:
    """Loose string form for the last-resort comparison: LaTeX noise, spaces, case and final period dropped."""
    s = _clean(s).lower()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).rstrip(".")


def _math_verify_equal(pred: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return False
    # math-verify's timeouts use SIGALRM, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify raises on exotic input; that answer simply does not match
        return False


def is_correct(pred: str | None, gold: str, kind: str = "numeric") -> bool:
    """Whether the extracted answer `pred` matches `gold` under `kind` ("numeric" or "math")."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is unknown; use one of {KINDS}")
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        return numbers_equal(p, g)
    if normalize_text(pred) == normalize_text(gold):
        return True
    if kind == "math":
        return _math_verify_equal(pred, gold)
    return False


@dataclass(frozen=True)
class Grade:
    prediction: str | None
    correct: bool
    truncated: bool = False  # stopped by the token cap with no non-empty \boxed{}: no final answer


def is_truncated(text: str, finished: bool) -> bool:
    """An answer stopped by the cap (not finished) whose text holds no non-empty \\boxed{}."""
    return not finished and not extract_boxed(_EMPTY_BOX.sub(" ", text or ""))


def grade(text: str, gold: str, kind: str = "numeric", finished: bool = True, truncated_rule: str = "strict") -> Grade:
    """Extract the answer from a model's full output `text` and check it against `gold`.

    finished: the answer ended by itself (EOS), not at the token cap. A truncated answer (see
    `is_truncated`) is never correct under truncated_rule "strict"; "lenient" grades its text.
    """
    if truncated_rule not in TRUNCATION_RULES:
        raise ValueError(f"truncated_rule {truncated_rule!r} is unknown; use one of {', '.join(TRUNCATION_RULES)}")
    prediction = extract_answer(text)
    truncated = is_truncated(text, finished)
    correct = is_correct(prediction, gold, kind) and not (truncated and truncated_rule == "strict")
    return Grade(prediction=prediction, correct=correct, truncated=truncated)


# ---------------------------------------------------------------- accuracy

@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    accuracy: float
    ci_low: float
    ci_high: float
    interval: str = "Wilson score, 95%"

    def __str__(self) -> str:
        return (
            f"{self.accuracy:.1%} ({self.correct}/{self.total}; {self.interval} CI "
            f"[{self.ci_low:.1%}, {self.ci_high:.1%}])"
        )


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (n = 0 gives (0, 1))."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(correct: list[bool]) -> Accuracy:
    k, n = int(sum(bool(c) for c in correct)), len(correct)
    low, high = wilson_interval(k, n)
    return Accuracy(correct=k, total=n, accuracy=k / n if n else float("nan"), ci_low=low, ci_high=high)
