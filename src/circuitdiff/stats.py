"""Paired statistics for base vs tuned: bootstrap CIs, sign-flip permutation tests, effect sizes.

Both models answer the same selected questions, so sample k of the base model and
sample k of the tuned model are a pair. Every procedure keeps the pairs together:

- bootstrap: resample question indices with replacement (the same draw for both
  models); each metric is recomputed on the resample. A resample is represented by
  its multiplicity weights w [n] (how often each question was drawn), which lets the
  pooled metrics be recomputed exactly without copying data (see the statistics below).
- permutation: under H0 (the two models are exchangeable within a question) the
  labels of each pair may be swapped; a sign flip s_k = 1 swaps sample k's base and
  tuned matrices. Exact (all 2^n flips) when 2^n <= n_perm, Monte Carlo otherwise.

A statistic is an object with ``n``, ``resampled(weights [B, n]) -> (base [B], tuned [B])``
and ``flipped(flips [P, n] bool) -> (base [P], tuned [P])``; ``per_sample`` holds paired
per-sample values (base [n], tuned [n]) when the metric is their mean, else None.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from circuitdiff import metrics as M


# ----------------------------------------------------------- resampling
def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n] question indices drawn with replacement."""
    return rng.integers(0, n, size=(n_boot, n))


def index_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """[B, n] multiplicities of each question in each resample."""
    B = idx.shape[0]
    weights = np.zeros((B, n))
    np.add.at(weights, (np.repeat(np.arange(B), idx.shape[1]), idx.ravel()), 1.0)
    return weights


def sign_flips(n: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """([P, n] bool swaps, exact): all 2^n flips when that is <= n_perm, else n_perm random ones."""
    if n <= 30 and 2**n <= n_perm:
        return np.array(list(itertools.product([False, True], repeat=n)), dtype=bool).reshape(-1, n), True
    return rng.random((n_perm, n)) < 0.5, False


CI_METHODS = ("bca", "percentile")


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values along axis 0 (nan values ignored)."""
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.nanpercentile(values, [tail, 100.0 - tail], axis=0)
    return lo, hi


def bca_ci(values: np.ndarray, point: float, jackknife: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Bias-corrected and accelerated interval (Efron 1987) of 1-D bootstrap values.

    z0 from the share of bootstrap values below the point estimate; the acceleration from the
    leave-one-question-out (jackknife) values. Falls back to the percentile interval when z0 is
    infinite (every bootstrap value on one side of the point estimate).
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    jackknife = np.asarray(jackknife, dtype=np.float64)
    if values.size == 0 or not np.isfinite(point):
        return float("nan"), float("nan")
    share = float(np.mean(values < point))
    if share in (0.0, 1.0) or not np.isfinite(jackknife).all():
        return percentile_ci(values, level)
    z0 = sps.norm.ppf(share)
    dev = jackknife.mean() - jackknife
    den = 6.0 * float(np.sum(dev**2)) ** 1.5
    accel = float(np.sum(dev**3)) / den if den > 0 else 0.0
    tail = (1.0 - level) / 2.0
    z = sps.norm.ppf([tail, 1.0 - tail])
    adjusted = sps.norm.cdf(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
    lo, hi = np.percentile(values, 100.0 * adjusted)
    return float(lo), float(hi)


def permutation_pvalue(observed: float, null: np.ndarray, exact: bool) -> float:
    """Two-sided p-value of |observed| against the null distribution of the statistic."""
    null = np.asarray(null)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or null.size == 0:
        return float("nan")
    tol = 1e-12 * max(abs(observed), 1e-300)
    hits = int(np.sum(np.abs(null) >= abs(observed) - tol))
    if exact:
        return hits / null.size
    return (hits + 1) / (null.size + 1)


def cohen_dz(base: np.ndarray, tuned: np.ndarray) -> float:
    """Paired standardized mean difference: mean(tuned - base) / sd(tuned - base) (ddof=1)."""
    d = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if d.size < 2:
        return float("nan")
    sd = d.std(ddof=1)
    if sd == 0:
        return float("nan") if d.mean() == 0 else math.copysign(math.inf, d.mean())
    return float(d.mean() / sd)


def wilcoxon_pvalue(base: np.ndarray, tuned: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (scipy defaults); nan if undefined."""
    d = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2 or np.all(d == 0):
        return float("nan")
    return float(sps.wilcoxon(d).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan entries are left out of the family and stay nan)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


# ----------------------------------------------------------- statistics
class MeanStatistic:
    """A metric that is the mean of per-sample values x_k (intensity, kurtosis).

    base/tuned are [n] or [n, m] (m metrics at once, e.g. one per source node); results keep the m axis.
    """

    def __init__(self, base: np.ndarray, tuned: np.ndarray):
        self.base, self.tuned = np.asarray(base, np.float64), np.asarray(tuned, np.float64)
        self.n = len(self.base)
        self.per_sample = (self.base, self.tuned)

    def resampled(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        total = weights.sum(axis=1)
        if self.base.ndim == 2:
            total = total[:, None]
        return weights @ self.base / total, weights @ self.tuned / total

    def flipped(self, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # swapped pairs exchange x_b and x_t: base' = (sum x_b + sum_k s_k (x_t - x_b)) / n
        S = flips.astype(np.float64)
        delta = S @ (self.tuned - self.base)
        return (self.base.sum(0) + delta) / self.n, (self.tuned.sum(0) - delta) / self.n


class PooledEntropyStatistic:
    """Information Complexity: entropy of the histogram of all samples pooled.

    Each sample's histogram counts H_k [bins] are computed once; a resample's pooled histogram
    is sum_k w_k H_k, i.e. exactly the histogram of the concatenated |W| of the resampled
    questions (duplicates counted as often as drawn). `exchangeable` False (each model binned on
    its own range): a swapped matrix would need the other model's bins, so the permutation test
    is not defined and gives NaN; the bootstrap keeps the bins of the full data.
    """

    def __init__(self, counts_base: np.ndarray, counts_tuned: np.ndarray, log_base: str, eps: float,
                 exchangeable: bool = True):
        self.Hb, self.Ht = np.asarray(counts_base, np.float64), np.asarray(counts_tuned, np.float64)
        self.n = len(self.Hb)
        self.log_base, self.eps = log_base, eps
        self.exchangeable = exchangeable
        self.per_sample = None

    def _H(self, counts: np.ndarray) -> np.ndarray:
        return M.entropy_of_counts(counts, self.log_base, self.eps)

    def resampled(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._H(weights @ self.Hb), self._H(weights @ self.Ht)

    def flipped(self, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.exchangeable:
            nan = np.full(len(flips), np.nan)
            return nan, nan
        S = flips.astype(np.float64)
        return self._H(S @ self.Ht + (1 - S) @ self.Hb), self._H(S @ self.Hb + (1 - S) @ self.Ht)


class PairwiseDiversityStatistic:
    """Diversity: 1 - mean Pearson correlation over pairs of distinct questions.

    The correlation blocks base-base, tuned-tuned and base-tuned serve every resample and
    every flip. In a bootstrap resample, pairs formed by two draws of the SAME
    question are left out (they would add correlation 1 and bias diversity down): the mean
    runs over ordered pairs (a, b) of draws with different questions, weight w_i w_j.
    """

    def __init__(self, X_base: np.ndarray, X_tuned: np.ndarray):
        n = len(X_base)
        zero_diag = lambda A: A - np.diag(np.diag(A))  # noqa: E731
        # each block on its own, so that identical models give bit-identical blocks
        self.Cbb, self.Ctt = zero_diag(M.correlation_matrix(X_base)), zero_diag(M.correlation_matrix(X_tuned))
        cross = M.correlation_matrix(X_base, X_tuned)
        self.Cbt, self.Ctb = zero_diag(cross), zero_diag(cross.T)
        self.n = n
        self.per_sample = (1.0 - self.Cbb.sum(1) / (n - 1), 1.0 - self.Ctt.sum(1) / (n - 1))

    @staticmethod
    def _quad(A: np.ndarray, C: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Row-wise a_p^T C b_p."""
        return ((A @ C) * B).sum(axis=1)

    def resampled(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = weights.sum(1) ** 2 - (weights**2).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            base = 1.0 - self._quad(weights, self.Cbb, weights) / pairs
            tuned = 1.0 - self._quad(weights, self.Ctt, weights) / pairs
        return base, tuned

    def flipped(self, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # keep[k] = 1 where pair k is not swapped; the group "tuned'" holds tuned_k if keep else base_k
        keep = 1.0 - flips.astype(np.float64)
        swap = 1.0 - keep
        q = self._quad
        tuned = q(keep, self.Ctt, keep) + q(keep, self.Ctb, swap) + q(swap, self.Cbt, keep) + q(swap, self.Cbb, swap)
        base = q(keep, self.Cbb, keep) + q(keep, self.Cbt, swap) + q(swap, self.Ctb, keep) + q(swap, self.Ctt, swap)
        pairs = self.n * (self.n - 1)
        return 1.0 - base / pairs, 1.0 - tuned / pairs


# ----------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Point values and 95% CIs for base, tuned and tuned - base, with tests and effect sizes."""

    base: float
    tuned: float
    diff: float
    base_ci: tuple[float, float]
    tuned_ci: tuple[float, float]
    diff_ci: tuple[float, float]
    p_perm: float
    perm_exact: bool
    p_wilcoxon: float
    cohen_dz: float
    n_samples: int
    n_boot: int
    n_perm: int

    @property
    def rel_diff(self) -> float:
        return self.diff / abs(self.base) if self.base not in (0, 0.0) and np.isfinite(self.base) else float("nan")

    @property
    def arrow(self) -> str:
        """'up' / 'down' when the diff CI excludes 0, else '' (no significant change)."""
        lo, hi = self.diff_ci
        if lo > 0:
            return "up"
        if hi < 0:
            return "down"
        return ""


def compare_all(stat, weights: np.ndarray, flips: np.ndarray, exact: bool, level: float = 0.95, ci: str = "percentile") -> list[Comparison]:
    """Paired comparisons of a statistic with m values (a trailing axis, or none for m = 1).

    weights [B, n] are the bootstrap resamples, flips [P, n] the sign flips of the permutation
    test. ci: "bca" (bias-corrected and accelerated, jackknife over questions) or "percentile".
    """
    if ci not in CI_METHODS:
        raise ValueError(f"ci {ci!r} is unknown; use one of {', '.join(CI_METHODS)}")

    def cols(pair):
        b, t = (np.asarray(v, dtype=np.float64) for v in pair)
        return (b[:, None], t[:, None]) if b.ndim == 1 else (b, t)

    point_b, point_t = cols(stat.resampled(np.ones((1, stat.n))))
    boot_b, boot_t = cols(stat.resampled(weights))
    null_b, null_t = cols(stat.flipped(flips))
    jack_b, jack_t = cols(stat.resampled(1.0 - np.eye(stat.n))) if ci == "bca" else (None, None)
    per = stat.per_sample
    if per is not None:
        per = cols(per)

    def interval(boot, point, jack):
        if ci == "bca":
            return tuple(map(float, bca_ci(boot, point, jack, level)))
        return tuple(map(float, percentile_ci(boot, level)))

    out = []
    for j in range(point_b.shape[1]):
        base, tuned = float(point_b[0, j]), float(point_t[0, j])
        jb = None if jack_b is None else jack_b[:, j]
        jt = None if jack_t is None else jack_t[:, j]
        out.append(Comparison(
            base=base,
            tuned=tuned,
            diff=tuned - base,
            base_ci=interval(boot_b[:, j], base, jb),
            tuned_ci=interval(boot_t[:, j], tuned, jt),
            diff_ci=interval(boot_t[:, j] - boot_b[:, j], tuned - base, None if jb is None else jt - jb),
            p_perm=permutation_pvalue(tuned - base, null_t[:, j] - null_b[:, j], exact),
            perm_exact=exact,
            p_wilcoxon=wilcoxon_pvalue(per[0][:, j], per[1][:, j]) if per is not None else float("nan"),
            cohen_dz=cohen_dz(per[0][:, j], per[1][:, j]) if per is not None else float("nan"),
            n_samples=stat.n,
            n_boot=len(weights),
            n_perm=len(flips),
        ))  # fmt: skip
    return out


def compare(stat, weights: np.ndarray, flips: np.ndarray, exact: bool, level: float = 0.95, ci: str = "percentile") -> Comparison:
    """Paired comparison of one scalar statistic (see `compare_all`)."""
    (result,) = compare_all(stat, weights, flips, exact, level, ci)
    return result


# ----------------------------------------------------------- accuracy of a pair
@dataclass(frozen=True)
class AccuracyDifference:
    """Accuracy of base and tuned on the same questions and tuned - base, paired.

    diff_ci: percentile interval of the paired bootstrap (questions resampled, the same draw for
    both models). p_mcnemar: exact two-sided McNemar test (a binomial test on the questions only
    one model gets right: base_only vs tuned_only).
    """

    n: int
    base: float
    tuned: float
    diff: float
    diff_ci: tuple[float, float]
    base_only: int
    tuned_only: int
    p_mcnemar: float
    n_boot: int
    seed: int

    def __str__(self) -> str:
        lo, hi = self.diff_ci
        return (f"{self.base:.1%} -> {self.tuned:.1%}, difference {self.diff:+.1%} (95% CI [{lo:+.1%}, {hi:+.1%}], "
                f"paired bootstrap over {self.n} questions, {self.n_boot} resamples, seed {self.seed}; "
                f"exact McNemar p = {self.p_mcnemar:.3g}, {self.tuned_only} questions only tuned solves, "
                f"{self.base_only} only base)")


def accuracy_difference(base_correct, tuned_correct, n_boot: int = 10000, seed: int = 0,
                        level: float = 0.95) -> AccuracyDifference:
    """Paired accuracy comparison of two models graded on the same questions (bool [n] each)."""
    b = np.asarray(base_correct, dtype=bool)
    t = np.asarray(tuned_correct, dtype=bool)
    if b.shape != t.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError("base_correct and tuned_correct must be non-empty 1-d arrays of the same length")
    n = len(b)
    idx = bootstrap_indices(n, n_boot, np.random.default_rng(seed))
    boot = t[idx].mean(axis=1) - b[idx].mean(axis=1)
    base_only, tuned_only = int((b & ~t).sum()), int((t & ~b).sum())
    discordant = base_only + tuned_only
    p = float(sps.binomtest(tuned_only, discordant, 0.5).pvalue) if discordant else 1.0
    lo, hi = percentile_ci(boot, level)
    return AccuracyDifference(n=n, base=float(b.mean()), tuned=float(t.mean()), diff=float(t.mean() - b.mean()),
                              diff_ci=(float(lo), float(hi)), base_only=base_only, tuned_only=tuned_only,
                              p_mcnemar=p, n_boot=n_boot, seed=seed)
