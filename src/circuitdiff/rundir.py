"""Paths inside a run directory (pure functions; nothing here touches the disk).

    RUN/
      manifest.json                                  versions, models, conventions, config
      generations/{role}/{dataset}.jsonl             one row per question (appended per batch)
      generations/{role}/{dataset}.meta.json         generation settings + key, grader version, accuracy
      selection/{dataset}/alpha={a}.json             chosen idx, T_bar, T_cut, filter counts, key
      attribution/{role}/{dataset}/alpha={a}.npz     W (same keys as `circuitdiff attribute`)
      attribution/{role}/{dataset}/alpha={a}.json    the idx order of its samples, settings, key
      attribution/{role}/{dataset}/alpha={a}.parts/  finished batches of an unfinished attribution

role is "base" or "tuned"; dataset is the dataset name, with "_{split}" when the split is not "test".
"""

from __future__ import annotations

from pathlib import Path

ROLES = ("base", "tuned")


def alpha_tag(alpha: float) -> str:
    """0.1 -> "alpha=0.1", 0.03 -> "alpha=0.03" (shortest exact decimal)."""
    return f"alpha={float(alpha)!r}"


def dataset_key(name: str, split: str = "test") -> str:
    return name if split == "test" else f"{name}_{split}"


def manifest(run: Path) -> Path:
    return Path(run) / "manifest.json"


def generations(run: Path, role: str, dataset: str) -> Path:
    return Path(run) / "generations" / role / f"{dataset}.jsonl"


def generations_meta(run: Path, role: str, dataset: str) -> Path:
    return Path(run) / "generations" / role / f"{dataset}.meta.json"


def selection(run: Path, dataset: str, alpha: float) -> Path:
    return Path(run) / "selection" / dataset / f"{alpha_tag(alpha)}.json"


def attribution(run: Path, role: str, dataset: str, alpha: float) -> Path:
    return Path(run) / "attribution" / role / dataset / f"{alpha_tag(alpha)}.npz"


def attribution_meta(run: Path, role: str, dataset: str, alpha: float) -> Path:
    return Path(run) / "attribution" / role / dataset / f"{alpha_tag(alpha)}.json"


def attribution_parts(run: Path, role: str, dataset: str, alpha: float) -> Path:
    return Path(run) / "attribution" / role / dataset / f"{alpha_tag(alpha)}.parts"
