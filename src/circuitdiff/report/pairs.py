"""Which comparisons a run's W files allow, read and matched sample by sample.

A comparison is (dataset, alpha, objective, text): the base and the tuned model scored with one
objective, each on its own answers (text "own"), or both on the base model's answers ("base") or
both on the tuned model's ("tuned") when the run computed those views (config `text`). An
own-text comparison with only one role, or two files that disagree (sample count, node names),
is skipped with a reason. Samples are matched by the question idx each W file records (its
meta), else by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from circuitdiff.errors import UserError
from circuitdiff.store import artifacts, layout
from circuitdiff.store.artifacts import Attribution


TEXT_MODES = {  # text -> ((model, text) of the base side, (model, text) of the tuned side)
    "own": (("base", "base"), ("tuned", "tuned")),
    "base": (("base", "base"), ("tuned", "base")),
    "tuned": (("base", "tuned"), ("tuned", "tuned")),
}
OBJECTIVE_ORDER = {"nll": 0, "logit": 1}


def scoring_order(scoring: str) -> tuple:
    """Sort key of a scoring folder name: EAP before other methods, nll before logit."""
    objective, method = layout.parse_scoring(scoring)
    return method != "eap", method, OBJECTIVE_ORDER.get(objective, 9), objective


@dataclass(frozen=True)
class PairRef:
    """Where the two W files of one comparison live."""

    dataset: str
    alpha: str  # as written in the file name
    objective: str  # the scoring folder: the objective, + the method when not eap ("nll+eap-ig8"; layout.scoring)
    text: str  # own | base | tuned
    base_path: Path
    tuned_path: Path
    selection_path: Path | None

    @property
    def alpha_value(self) -> float:
        return float(self.alpha)


@dataclass
class PairData:
    ref: PairRef
    base: Attribution
    tuned: Attribution
    selection: dict = field(default_factory=dict)
    paired_by: str = "position"  # "question idx" when both files record their samples' idx


@dataclass
class RunIndex:
    run_dir: Path
    manifest: dict
    pairs: list[PairRef]
    skipped: list[tuple[str, str, str]]  # (dataset, alpha, reason)


def index_run(run_dir: str | Path) -> RunIndex:
    """Find every (dataset, alpha) with attribution files; pairs need both roles."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the directory a `circuitdiff run` wrote")
    found = layout.find_attributions(run_dir)
    if not found:
        raise UserError(
            f"{run_dir} holds no attribution/{{objective}}/{{base,tuned}}/{{dataset}}/alpha={{a}}.npz files; "
            "run the attribution stage first (or pass the right run directory)"
        )
    pairs, skipped = [], []
    order = lambda kv: (kv[0][1], float(kv[0][2]), scoring_order(kv[0][0]))  # noqa: E731
    for (objective, dataset, alpha), views in sorted(found.items(), key=order):
        sel = layout.selection(run_dir, dataset, float(alpha))
        for text, (base_view, tuned_view) in TEXT_MODES.items():
            missing = [v for v in (base_view, tuned_view) if v not in views]
            if missing:
                if text == "own":
                    skipped.append((dataset, alpha, f"no {missing[0][0]} attribution file (objective {objective})"))
                continue
            pairs.append(PairRef(dataset, alpha, objective, text, views[base_view], views[tuned_view],
                                 sel if sel.exists() else None))
    return RunIndex(run_dir, artifacts.read_manifest(run_dir), pairs, skipped)


def read_attr(path: Path) -> Attribution:
    """A W file for the report: the loss in float64."""
    attr = Attribution.load(path)
    attr.loss = np.asarray(attr.loss, dtype=np.float64)
    return attr


def pair_problem(base: Attribution, tuned: Attribution) -> str | None:
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


def sample_idx(attr: Attribution) -> list | None:
    """The question idx of each sample, as recorded in the W file's meta."""
    return attr.meta["idx"] if isinstance(attr.meta.get("idx"), list) else None


def align(base: Attribution, tuned: Attribution, idx_base: list | None, idx_tuned: list | None) -> tuple[str | None, str]:
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
    problem, paired_by = align(base, tuned, sample_idx(base), sample_idx(tuned))
    if problem:
        return None, problem
    selection = artifacts.read_result(ref.selection_path) if ref.selection_path else {}
    return PairData(ref, base, tuned, selection or {}, paired_by), None
