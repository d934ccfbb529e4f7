"""Reading and writing what a run directory holds, with numpy only (reading results never imports torch).

- `Attribution`: the per-sample edge scores W of one model on a list of samples (W.npz);
- generations: one JSON row per question (`read_generations`);
- selections: the chosen questions and T_cut of one (dataset, alpha) (`read_selection`);
- `selected_samples`: the attribution samples of a run, the one way every stage builds them;
- `answered_questions`: the first n questions of a role's generations with its own-answer samples;
- `run_model`: the model spec and dtype of a role, from the manifest.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from circuitdiff import io
from circuitdiff.errors import UserError
from circuitdiff.store import layout


@dataclass
class Attribution:
    """Per-sample edge scores: scores[k, d, u] for destination d and source u of sample k."""

    scores: np.ndarray  # [n_samples, n_dst, n_src]
    src_names: list[str]
    dst_names: list[str]
    edge_mask: np.ndarray  # bool [n_dst, n_src]; False = impossible edge (score 0)
    granularity: str
    loss: np.ndarray  # [n_samples]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return io.write_npz(
            path,
            scores=self.scores.astype(np.float32),
            src_names=np.asarray(self.src_names),
            dst_names=np.asarray(self.dst_names),
            edge_mask=self.edge_mask.astype(bool),
            granularity=np.asarray(self.granularity),
            loss=self.loss.astype(np.float32),
            meta=np.asarray(json.dumps(self.meta, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Attribution":
        """Read a W.npz; a missing or damaged file is a UserError naming it."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path} does not exist; run the attribute stage first (or check the path)")
        try:
            with np.load(path, allow_pickle=False) as data:
                scores = np.asarray(data["scores"])
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
                mask = data["edge_mask"].astype(bool) if "edge_mask" in data else np.ones(scores.shape[1:], bool)
                return cls(
                    scores=scores,
                    src_names=[str(s) for s in data["src_names"]],
                    dst_names=[str(s) for s in data["dst_names"]],
                    edge_mask=mask,
                    granularity=str(data["granularity"]) if "granularity" in data else str(meta.get("granularity", "block")),
                    loss=data["loss"] if "loss" in data else np.full(len(scores), np.nan),
                    meta=meta,
                )
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"{path}: not a readable W.npz ({type(err).__name__}: {err}); delete it and re-run the "
                            "attribute stage") from None


# ---------------------------------------------------------------- generations and selections
ROW_FIELDS = {"idx": int, "gold": str, "prompt_ids": list, "answer_ids": list, "answer_text": str, "correct": bool}


def row_check(row: dict) -> str:
    """A generations row's own checksum (16 hex of the SHA-256 of its other fields): appended rows have no
    key file, so each row carries its checksum and a bit flip anywhere in it is seen."""
    return hashlib.sha256(json.dumps({k: v for k, v in row.items() if k != "check"}, sort_keys=True).encode()).hexdigest()[:16]


def with_check(row: dict) -> dict:
    return {**{k: v for k, v in row.items() if k != "check"}, "check": row_check(row)}


def row_ok(row: dict) -> bool:
    """A generations row has its fields with their types, and matches its checksum (rows written before
    checksums existed have none and are accepted on their fields)."""
    if not all(isinstance(row.get(k), t) and not (t is int and isinstance(row.get(k), bool)) for k, t in ROW_FIELDS.items()):
        return False
    return "check" not in row or row["check"] == row_check(row)


def read_generations(run: Path, role: str, dataset: str) -> list[dict]:
    """The rows of a role's generations file (a line cut off by a kill is ignored; any other damage is a
    DamagedFile naming the line); [] if there is none."""
    return io.read_jsonl_tolerant(layout.generations(run, role, dataset), row_ok)


def generation_key(run: Path, role: str, dataset: str) -> str | None:
    """The key of a role's generations (its meta file), or None when the run has none."""
    path = layout.generations_meta(run, role, dataset)
    if not path.exists():
        return None
    meta = io.read_json(path)
    return meta.get("key") if isinstance(meta, dict) else None


def require(path: Path, stage: str, hint: str = "check --run/--dataset/--alpha") -> Path:
    if not path.exists():
        raise UserError(f"{path} does not exist; run the {stage} stage first (circuitdiff run ... --until {stage}) "
                        f"or {hint}")
    return path


def read_selection(run: Path, dataset: str, alpha: float) -> dict:
    path = require(layout.selection(run, dataset, alpha), "select")
    data = io.read_json(path)
    if not isinstance(data, dict) or "T_cut" not in data:
        raise UserError(f"{path} is not a selection file (no T_cut); delete it and re-run the select stage")
    return data


def selected_samples(run: str | Path, role: str, dataset: str, alpha: float,
                     n: int | None = None) -> tuple[list[dict], dict]:
    """The attribution samples of a run: the selected questions in selection order (the first n), each
    the role's prompt + its own answer, cut at T_cut. Returns (samples, where) with where = {idx, T_cut,
    selection}."""
    run = Path(run)
    if role not in layout.ROLES:
        raise UserError(f"role {role!r} is unknown; use base or tuned")
    require(layout.generations(run, role, dataset), "generate")
    sel = read_selection(run, dataset, alpha)
    rows = {r["idx"]: r for r in read_generations(run, role, dataset)}
    idx = list(sel.get("idx", []))[: n if n else None]
    if not idx:
        raise UserError(f"{layout.selection(run, dataset, alpha)} selected no samples (no question survived the "
                        "selection); use --model/--samples with a samples file instead")
    missing = [i for i in idx if i not in rows]
    if missing:
        raise UserError(f"{layout.generations(run, role, dataset)} lacks the selected questions {missing[:5]}; "
                        "re-run the generate stage")
    T_cut = int(sel["T_cut"])
    samples = [{"prompt_ids": rows[i]["prompt_ids"], "answer_ids": rows[i]["answer_ids"], "cut_len": T_cut} for i in idx]
    selection = layout.selection(run, dataset, alpha).relative_to(run).as_posix()  # relative: a run can move
    return samples, {"idx": idx, "T_cut": T_cut, "selection": selection}


def answered_questions(run: str | Path, role: str, dataset: str, T_cut: int,
                       n: int) -> tuple[list[dict], list[dict]]:
    """(questions, loss samples) for the first n questions (by idx) of the role's generations.

    questions: {idx, prompt_ids, gold, kind}. Loss samples: each question's own greedy answer with
    cut_len = min(T_cut, answer length); questions with an empty answer get no loss sample.
    """
    path = require(layout.generations(run, role, dataset), "generate")
    rows = sorted(read_generations(run, role, dataset), key=lambda r: r["idx"])[:n]
    if not rows:
        raise UserError(f"{path} holds no answers")
    questions = [{"idx": r["idx"], "prompt_ids": r["prompt_ids"], "gold": r["gold"], "kind": r.get("kind", "numeric")}
                 for r in rows]
    samples = [{"idx": r["idx"], "prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"],
                "cut_len": min(T_cut, len(r["answer_ids"]))} for r in rows if r["answer_ids"]]
    return questions, samples


def read_manifest(run: Path) -> dict:
    """The run's manifest ({} when there is none or it is damaged: it records, it does not decide)."""
    path = layout.manifest(run)
    if not path.exists():
        return {}
    try:
        data = io.read_json(path)
    except io.DamagedFile:
        return {}
    return data if isinstance(data, dict) else {"manifest": data}


def record_timings(run: Path, output: Path, timings: dict) -> None:
    """Wall-clock times of a stage's output go into the manifest (`timings`), so that results stay byte-identical
    between runs; `output` is named relative to the run."""
    if not timings:
        return
    path = layout.manifest(run)
    data = read_manifest(run)
    data.setdefault("timings", {})[Path(output).resolve().relative_to(Path(run).resolve()).as_posix()] = timings
    io.write_json(path, data)


def run_model(run: str | Path, role: str) -> tuple[str, str]:
    """(model spec, dtype) of `role` from RUN/manifest.json."""
    path = layout.manifest(Path(run))
    if not path.exists():
        raise UserError(f"{path} does not exist; pass the directory a `circuitdiff run` wrote")
    config = io.read_json(path).get("config", {})
    spec = (config.get(role) or {}).get("spec")
    if not spec:
        raise UserError(f"{path} names no config.{role}.spec; was it written by `circuitdiff run`?")
    return spec, config.get("dtype", "float32")


def read_result(path: Path) -> dict | None:
    """A JSON result (validation, intervention) as a dict, or None when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
