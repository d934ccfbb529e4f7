"""Stage `grade`: every answer graded (circuitdiff.grade), and each model's accuracy recorded.

Rows are graded as they are generated; when the grader version or the truncation rule
(`grading.truncated`) recorded in the generations' meta file differs from the current one, the
rows are re-graded from their text and stop reason and the file rewritten atomically. The accuracy (Wilson 95% interval) goes into the meta file and the manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from circuitdiff.errors import UserError
from circuitdiff.grade import GRADER_VERSION, REL_TOL, accuracy, grade
from circuitdiff.io import read_json, write_json, write_jsonl
from circuitdiff.store import artifacts, layout


def regrade(rows: list[dict], truncated_rule: str = "strict") -> list[dict]:
    """Rows with `prediction`, `truncated` and `correct` recomputed from `answer_text` and `stop`."""
    out = []
    for row in rows:
        graded = grade(row["answer_text"], row["gold"], row.get("kind", "numeric"),
                       finished=row.get("stop", "eos") == "eos", truncated_rule=truncated_rule)
        out.append(artifacts.with_check({**row, "prediction": graded.prediction, "truncated": graded.truncated,
                                         "correct": graded.correct}))
    return out


def stage(ctx) -> None:
    for role in layout.ROLES:
        for ds in ctx.config.datasets:
            grade_one(ctx, role, ds)


def grade_one(ctx, role: str, ds) -> None:
    path = layout.generations(ctx.run, role, ds.key)
    meta_path = layout.generations_meta(ctx.run, role, ds.key)
    if not meta_path.exists():
        raise UserError(f"{meta_path} does not exist; run the generate stage first")
    meta = read_json(meta_path)
    before = json.dumps(meta, sort_keys=True)
    rule = ctx.config.grading.truncated
    if meta.get("grader") != GRADER_VERSION or meta.get("truncated_rule", "lenient") != rule:
        write_jsonl(path, regrade(artifacts.read_generations(ctx.run, role, ds.key), rule))
        meta.update({"grader": GRADER_VERSION, "truncated_rule": rule})
        ctx.log(f"grade {role} {ds.key}: re-graded with grader version {GRADER_VERSION}, truncated answers {rule}")
    rows = ctx.rows(role, ds)
    missing = len(ctx.problems(ds)) - len(rows)
    if missing:
        raise UserError(f"{path} lacks {missing} answers; run the generate stage first")
    acc = accuracy([r["correct"] for r in rows])
    meta["accuracy"] = {**asdict(acc), "dataset": ds.key, "n_questions": len(rows)}
    if json.dumps(meta, sort_keys=True) != before:
        write_json(meta_path, meta)
    ctx.update_manifest("accuracy", role, ds.key, value=meta["accuracy"])
    stops = sum(r.get("stop") == "length" for r in rows)
    cut = sum(bool(r.get("truncated")) for r in rows)
    ctx.log(f"grade {role} {ds.key}: accuracy {acc} [{stops} answers hit max_new_tokens, {cut} of them without a "
            f"\\boxed{{}} answer ({rule}: {'never correct' if rule == 'strict' else 'graded by their text'}); grading: "
            f"last non-empty \\boxed{{}}, else 'the answer is', else last number; integers exact, other numbers rel. "
            f"tol. {REL_TOL:g}; math-verify]")
