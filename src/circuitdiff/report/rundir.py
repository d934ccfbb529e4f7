"""Read a run directory: which (dataset, alpha) pairs have W for both models, and their files.

Layout (BRIEF.md): ``attribution/{role}/{dataset}/alpha={a}.npz`` for role in base/tuned,
``selection/{dataset}/alpha={a}.json``, ``manifest.json``. Pairs with only one role, or
whose two files disagree (sample count, node names), are skipped with a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from circuitdiff import io
from circuitdiff.errors import UserError

ROLES = ("base", "tuned")


@dataclass(frozen=True)
class PairRef:
    """Where the two W files of one (dataset, alpha) live."""

    dataset: str
    alpha: str  # as written in the file name
    base_path: Path
    tuned_path: Path
    selection_path: Path | None

    @property
    def alpha_value(self) -> float:
        return float(self.alpha)


@dataclass
class Attr:
    """The content of one W.npz."""

    scores: np.ndarray  # [n_samples, n_dst, n_src]
    src_names: list[str]
    dst_names: list[str]
    edge_mask: np.ndarray  # bool [n_dst, n_src]
    granularity: str
    loss: np.ndarray  # [n_samples]
    meta: dict


@dataclass
class PairData:
    ref: PairRef
    base: Attr
    tuned: Attr
    selection: dict = field(default_factory=dict)
    paired_by: str = "position"  # "question idx" when both files record their samples' idx


@dataclass
class RunIndex:
    run_dir: Path
    manifest: dict
    pairs: list[PairRef]
    skipped: list[tuple[str, str, str]]  # (dataset, alpha, reason)


def _alpha_of(path: Path) -> str | None:
    stem = path.name[: -len(".npz")]
    if not stem.startswith("alpha="):
        return None
    label = stem[len("alpha=") :]
    try:
        float(label)
    except ValueError:
        return None
    return label


def index_run(run_dir: str | Path) -> RunIndex:
    """Find every (dataset, alpha) with attribution files; pairs need both roles."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the directory a `circuitdiff run` wrote")
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for role in ROLES:
        for path in sorted((run_dir / "attribution" / role).glob("*/alpha=*.npz")):
            alpha = _alpha_of(path)
            if alpha is not None:
                found.setdefault((path.parent.name, alpha), {})[role] = path
    if not found:
        raise UserError(
            f"{run_dir} holds no attribution/{{base,tuned}}/{{dataset}}/alpha={{a}}.npz files; "
            "run the attribution stage first (or pass the right run directory)"
        )
    pairs, skipped = [], []
    for (dataset, alpha), paths in sorted(found.items(), key=lambda kv: (kv[0][0], float(kv[0][1]))):
        missing = [r for r in ROLES if r not in paths]
        if missing:
            skipped.append((dataset, alpha, f"no {missing[0]} attribution file"))
            continue
        sel = run_dir / "selection" / dataset / f"alpha={alpha}.json"
        pairs.append(PairRef(dataset, alpha, paths["base"], paths["tuned"], sel if sel.exists() else None))
    manifest_path = run_dir / "manifest.json"
    manifest = io.read_json(manifest_path) if manifest_path.exists() else {}
    return RunIndex(run_dir, manifest if isinstance(manifest, dict) else {"manifest": manifest}, pairs, skipped)


def read_attr(path: Path) -> Attr:
    try:
        with np.load(path, allow_pickle=False) as data:
            scores = np.asarray(data["scores"])
            n_dst, n_src = scores.shape[1:]
            mask = data["edge_mask"].astype(bool) if "edge_mask" in data else np.ones((n_dst, n_src), bool)
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            return Attr(
                scores=scores,
                src_names=[str(s) for s in data["src_names"]],
                dst_names=[str(s) for s in data["dst_names"]],
                edge_mask=mask,
                granularity=str(data["granularity"]) if "granularity" in data else str(meta.get("granularity", "block")),
                loss=np.asarray(data["loss"], dtype=np.float64) if "loss" in data else np.full(len(scores), np.nan),
                meta=meta,
            )
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"{path}: not a readable W.npz ({err}); re-run the attribution stage for it") from None


def pair_problem(base: Attr, tuned: Attr) -> str | None:
    """Why two W files cannot be compared sample by sample, or None."""
    if base.scores.ndim != 3 or tuned.scores.ndim != 3:
        return "scores are not [n_samples, n_dst, n_src]"
    if base.scores.shape[0] != tuned.scores.shape[0]:
        return f"base has {base.scores.shape[0]} samples, tuned {tuned.scores.shape[0]}; both must score the same questions"
    if base.scores.shape[0] < 2:
        return "fewer than 2 samples"
    if base.src_names != tuned.src_names or base.dst_names != tuned.dst_names:
        return "base and tuned have different node names (different granularity or architecture)"
    if base.granularity != tuned.granularity:
        return f"granularity differs (base {base.granularity}, tuned {tuned.granularity})"
    if not np.array_equal(base.edge_mask, tuned.edge_mask):
        return "base and tuned have different edge masks"
    if not (np.isfinite(base.scores).all() and np.isfinite(tuned.scores).all()):
        return "scores contain NaN or inf"
    return None


def sample_idx(attr: Attr, npz_path: Path) -> list | None:
    """The question idx of each sample: from the W file's meta, else its sidecar alpha={a}.json."""
    if isinstance(attr.meta.get("idx"), list):
        return attr.meta["idx"]
    sidecar = npz_path.with_suffix(".json")
    if sidecar.exists():
        side = io.read_json(sidecar)
        if isinstance(side, dict) and isinstance(side.get("idx"), list):
            return side["idx"]
    return None


def align(base: Attr, tuned: Attr, idx_base: list | None, idx_tuned: list | None) -> tuple[str | None, str]:
    """Put tuned's samples in base's question order (in place). Returns (problem, paired_by)."""
    if idx_base is None or idx_tuned is None:
        return None, "position"
    if len(idx_base) != len(base.scores) or len(idx_tuned) != len(tuned.scores):
        return "the recorded idx list does not match the number of samples", "position"
    if idx_base == idx_tuned:
        return None, "question idx"
    if sorted(map(str, idx_base)) != sorted(map(str, idx_tuned)) or len(set(map(str, idx_base))) != len(idx_base):
        shared = len(set(map(str, idx_base)) & set(map(str, idx_tuned)))
        return f"base and tuned scored different questions ({shared} of {len(idx_base)} shared); re-run attribution", "position"
    where = {str(q): k for k, q in enumerate(idx_tuned)}
    order = np.array([where[str(q)] for q in idx_base])
    tuned.scores, tuned.loss = tuned.scores[order], tuned.loss[order]
    return None, "question idx (tuned reordered)"


def load_pair(ref: PairRef) -> tuple[PairData | None, str | None]:
    """(PairData, None), or (None, reason) when the pair cannot be compared."""
    base, tuned = read_attr(ref.base_path), read_attr(ref.tuned_path)
    problem = pair_problem(base, tuned)
    if problem:
        return None, problem
    problem, paired_by = align(base, tuned, sample_idx(base, ref.base_path), sample_idx(tuned, ref.tuned_path))
    if problem:
        return None, problem
    selection = io.read_json(ref.selection_path) if ref.selection_path else {}
    return PairData(ref, base, tuned, selection if isinstance(selection, dict) else {}, paired_by), None
