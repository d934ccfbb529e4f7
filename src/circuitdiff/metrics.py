"""Circuit metrics over per-sample edge matrices W (docs/method.md, section 7).

Pure functions on arrays. ``W`` is ``[n_samples, n_dst, n_src]`` with a boolean
``edge_mask [n_dst, n_src]`` (False = impossible edge, stored as 0). Which entries
count is chosen by ``entries``:

- ``all``: every n_dst x n_src entry, structural zeros included (the paper's dense
  matrix; at qkv granularity this is the authors' (1+2L) x (4L+1) matrix, transposed);
- ``edges``: only the entries where edge_mask is True.

``select_entries`` turns W into ``X [n_samples, n_entries]``; the metrics take X, so
every metric is available per sample (for resampling) and pooled. ``scaled`` puts X on a
scale (choices.SCALES): ``raw`` (the paper's) or ``unit`` (each sample divided by its own
mean |X|: what is left is the shape of the sample's distribution, not its size).

Histogram conventions (Information Complexity, per-node output entropy) live in
``HistogramSpec``: number of equal-width bins, range, log base and eps. Values
outside the range are clipped into the first/last bin (every entry is counted).
Entropy is ``-sum_b p_b log(p_b + eps) / log(base)``, with 0 log 0 = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ENTRIES = ("all", "edges")
LOG_BASES = {"e": math.e, "2": 2.0, "10": 10.0}

METRICS = ("activation_intensity", "information_complexity", "distribution_kurtosis", "diversity")
SCALE_FREE = ("distribution_kurtosis", "diversity")  # unchanged when a sample's W is multiplied by a constant
SCALED_METRICS = {  # the metrics reported on each scale (unit intensity is 1 by construction)
    "unit": ("information_complexity", "distribution_kurtosis", "diversity"),
    "raw": METRICS,
}
METRIC_LABELS = {
    "activation_intensity": "Act. Intens.",
    "information_complexity": "Info. Complex.",
    "distribution_kurtosis": "Dist. Kurt.",
    "diversity": "Diversity",
}


@dataclass(frozen=True)
class HistogramSpec:
    """Histogram and entropy conventions: `bins` equal-width bins over `range`, entropy in `log_base`."""

    bins: int = 100
    range: tuple[float, float] | None = None  # None: shared [0, max |W|] of the pair, set by the caller
    log_base: str = "e"
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ValueError(f"bins={self.bins} must be at least 1")
        if self.log_base not in LOG_BASES:
            raise ValueError(f"log_base {self.log_base!r} is unknown; use one of {', '.join(LOG_BASES)}")
        if self.eps < 0:
            raise ValueError(f"eps={self.eps} must be >= 0")
        if self.range is not None and not self.range[1] >= self.range[0]:
            raise ValueError(f"range {self.range} must have hi >= lo")


# ---------------------------------------------------------------- entries
def select_entries(W: np.ndarray, edge_mask: np.ndarray, entries: str) -> np.ndarray:
    """W [n, n_dst, n_src] -> X [n, n_entries] in float64 (all entries, or only real edges)."""
    if entries not in ENTRIES:
        raise ValueError(f"entries {entries!r} is unknown; use one of {', '.join(ENTRIES)}")
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 3 or W.shape[1:] != edge_mask.shape:
        raise ValueError(f"W has shape {W.shape}; expected [n_samples, {edge_mask.shape[0]}, {edge_mask.shape[1]}]")
    if entries == "all":
        return W.reshape(W.shape[0], -1)
    return W[:, edge_mask.astype(bool)]


def scaled(X: np.ndarray, scale: str) -> np.ndarray:
    """X on `scale`: "raw" as is; "unit": each row divided by its own mean |X| (a zero row stays 0)."""
    if scale == "raw":
        return X
    if scale != "unit":
        raise ValueError(f"scale {scale!r} is unknown; use raw or unit")
    size = np.abs(X).mean(axis=1, keepdims=True)
    return np.divide(X, size, out=np.zeros_like(X), where=size > 0)


# ------------------------------------------------------- Activation Intensity
def intensity_per_sample(X: np.ndarray) -> np.ndarray:
    """[n] mean |W| of each sample."""
    return np.abs(X).mean(axis=1)


def activation_intensity(X: np.ndarray) -> float:
    """Mean over samples and entries of |W|."""
    return float(intensity_per_sample(X).mean())


# --------------------------------------------------- Information Complexity
def shared_range(*Xs: np.ndarray) -> tuple[float, float]:
    """[0, max |W|] over every given matrix: the default histogram range of a model pair."""
    hi = max(float(np.abs(X).max()) if X.size else 0.0 for X in Xs)
    return (0.0, hi)


def sample_histograms(X: np.ndarray, spec: HistogramSpec, value_range: tuple[float, float]) -> np.ndarray:
    """counts [n, bins] of |X| per sample; equal-width bins over value_range, outliers clipped in."""
    lo, hi = value_range
    A = np.abs(X)
    width = (hi - lo) / spec.bins
    if width > 0:
        idx = np.floor((A - lo) / width).astype(np.int64)
    else:  # degenerate range (all |W| equal): one occupied bin
        idx = np.zeros(A.shape, dtype=np.int64)
    np.clip(idx, 0, spec.bins - 1, out=idx)
    n = A.shape[0]
    flat = idx + (np.arange(n, dtype=np.int64) * spec.bins)[:, None]
    return np.bincount(flat.ravel(), minlength=n * spec.bins).reshape(n, spec.bins).astype(np.float64)


def entropy_of_counts(counts: np.ndarray, log_base: str = "e", eps: float = 0.0) -> np.ndarray:
    """Entropy of the distribution(s) counts / sum along the last axis; nan where the sum is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / total
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) + eps), 0.0)
    H = -terms.sum(axis=-1) / math.log(LOG_BASES[log_base])
    return np.where(total[..., 0] > 0, H, np.nan)


def information_complexity(X: np.ndarray, spec: HistogramSpec, value_range: tuple[float, float] | None = None) -> float:
    """Entropy of ONE histogram of all samples' |W| pooled together (the paper's definition)."""
    value_range = value_range or spec.range or shared_range(X)
    counts = sample_histograms(X, spec, value_range).sum(axis=0)
    return float(entropy_of_counts(counts, spec.log_base, spec.eps))


def complexity_per_sample(X: np.ndarray, spec: HistogramSpec, value_range: tuple[float, float]) -> np.ndarray:
    """[n] entropy of each sample's own histogram (same bins); NOT the pooled metric, shown for reference."""
    return entropy_of_counts(sample_histograms(X, spec, value_range), spec.log_base, spec.eps)


# ---------------------------------------------------- Distribution Kurtosis
def kurtosis_per_sample(X: np.ndarray) -> np.ndarray:
    """[n] excess (Fisher) kurtosis of each sample's signed entries, biased moments; nan if constant."""
    Xc = X - X.mean(axis=1, keepdims=True)
    np.square(Xc, out=Xc)
    m2 = Xc.mean(axis=1)
    m4 = np.einsum("ij,ij->i", Xc, Xc) / X.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m2 > 0, m4 / np.where(m2 > 0, m2, 1.0) ** 2 - 3.0, np.nan)


def distribution_kurtosis(X: np.ndarray) -> float:
    """Mean over samples of the excess kurtosis of W^(k)."""
    return float(kurtosis_per_sample(X).mean())


# ------------------------------------------------------------- Diversity
def _standardized_rows(X: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(axis=1, keepdims=True)
    norm = np.sqrt((Xc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        Z = Xc / norm[:, None]
    Z[~np.isfinite(Z)] = np.nan
    return Z


def correlation_matrix(X: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
    """[n, m] Pearson correlation between the rows of X and those of Y (default Y = X; rows are the
    flattened W of each sample); nan for a constant row. The same inputs give bit-identical output."""
    Z = _standardized_rows(X)
    C = Z @ (Z if Y is None else _standardized_rows(Y)).T
    np.clip(C, -1.0, 1.0, out=C)
    return C


def pairwise_correlations(X: np.ndarray) -> np.ndarray:
    """The n(n-1)/2 correlations of distinct sample pairs (upper triangle)."""
    C = correlation_matrix(X)
    return C[np.triu_indices(len(C), k=1)]


def diversity(X: np.ndarray) -> float:
    """1 - mean Pearson correlation over all pairs of distinct samples."""
    if X.shape[0] < 2:
        return float("nan")
    return float(1.0 - pairwise_correlations(X).mean())


def diversity_per_sample(X: np.ndarray) -> np.ndarray:
    """[n] 1 - mean correlation of sample k with every other sample; their mean is `diversity`."""
    C = correlation_matrix(X)
    n = len(C)
    return 1.0 - (C.sum(axis=1) - np.diag(C)) / (n - 1)


# ------------------------------------------------- per-node output entropy
def output_entropy_per_source(W: np.ndarray, edge_mask: np.ndarray, log_base: str = "e", eps: float = 0.0) -> np.ndarray:
    """[n, n_src]: for each sample and source, the entropy of its |outgoing edge weights| normalised to 1.

    Only real edges enter; structural zeros would add p = 0 terms, which contribute nothing, so
    `entries` does not change this metric. nan for a source whose outgoing weights are all 0.
    """
    A = np.abs(np.asarray(W, dtype=np.float64)) * edge_mask[None].astype(np.float64)
    return entropy_of_counts(np.swapaxes(A, 1, 2), log_base, eps)  # [n, n_src, n_dst] -> [n, n_src]


# --------------------------------------------------- relative change per edge
def mean_abs(W: np.ndarray) -> np.ndarray:
    """[n_dst, n_src] mean over samples of |W|."""
    return np.abs(np.asarray(W, dtype=np.float64)).mean(axis=0)


def relative_change(mean_abs_base: np.ndarray, mean_abs_tuned: np.ndarray, edge_mask: np.ndarray) -> np.ndarray:
    """(mean|W_tuned| - mean|W_base|) / mean|W_base| per edge; nan for impossible edges and a zero base."""
    ok = edge_mask.astype(bool) & (mean_abs_base > 0)
    out = np.full(mean_abs_base.shape, np.nan)
    out[ok] = (mean_abs_tuned[ok] - mean_abs_base[ok]) / mean_abs_base[ok]
    return out
