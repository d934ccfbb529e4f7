"""Everything the report shows about one comparison, computed once from its two W files.

A comparison is (dataset, alpha, objective, text): base and tuned scored with one objective,
each on its own answers (text "own") or both on the same model's answers (text "base" /
"tuned"). `analyse_pair` keeps only small summaries (metric comparisons per entries mode and
scale, aggregated mean |W|, per-node entropies, the loss and its relation to intensity, the
correlation matrices of the primary entries mode), so the W matrices can be dropped before the
next comparison is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from circuitdiff import metrics as M
from circuitdiff import stats as S
from circuitdiff.choices import RANGES, SCALES
from circuitdiff.graph import parse_node
from circuitdiff.report.pairs import PairData
from circuitdiff.store.layout import parse_scoring


@dataclass(frozen=True)
class Settings:
    """The report's conventions; every output names them."""

    entries: tuple[str, ...] = ("all", "edges")  # the first is the primary mode (figures)
    scales: tuple[str, ...] = ("unit", "raw")  # unit first: the shape metrics are read there first
    bins: int = 100
    range: str | tuple[float, float] = "shared"  # "shared", "own", or a fixed (lo, hi) on the raw scale
    log_base: str = "e"
    eps: float = 1e-12
    n_boot: int = 10000
    n_perm: int = 10000
    seed: int = 0
    level: float = 0.95
    ci: str = "percentile"  # or "bca"; percentile held its level better in null simulations (docs/report.md)
    ref_alpha: float = 0.1

    def __post_init__(self) -> None:
        if not self.entries or any(e not in M.ENTRIES for e in self.entries):
            raise ValueError(f"entries {self.entries} must be a non-empty list of {', '.join(M.ENTRIES)}")
        if not self.scales or any(s not in SCALES for s in self.scales):
            raise ValueError(f"scales {self.scales} must be a non-empty list of {', '.join(SCALES)}")
        if self.n_boot < 100 or self.n_perm < 100:
            raise ValueError(f"n_boot={self.n_boot} and n_perm={self.n_perm} must be at least 100")
        if self.ci not in S.CI_METHODS:
            raise ValueError(f"ci {self.ci!r} is unknown; use one of {', '.join(S.CI_METHODS)}")
        if not 0 < self.level < 1:
            raise ValueError(f"level={self.level} must be in (0, 1)")
        if isinstance(self.range, str):
            if self.range not in RANGES:
                raise ValueError(f"range {self.range!r} is unknown; use shared, own or LO:HI")
        elif not (len(self.range) == 2 and self.range[1] > self.range[0]):
            raise ValueError(f"range {self.range} must be (lo, hi) with hi > lo")
        M.HistogramSpec(self.bins, None, self.log_base, self.eps)  # validates

    def spec(self) -> M.HistogramSpec:
        return M.HistogramSpec(self.bins, None, self.log_base, self.eps)

    def range_mode(self, scale: str) -> str:
        """shared, own or fixed; a fixed range is in raw units, so the unit scale uses shared bins."""
        if isinstance(self.range, str):
            return self.range
        return "fixed" if scale == "raw" else "shared"

    @property
    def range_label(self) -> str:
        if isinstance(self.range, str):
            return f"{self.range} {RANGES[self.range]}"
        return f"fixed [{self.range[0]:g}, {self.range[1]:g}] on the raw scale (the unit scale: shared)"

    @property
    def ci_method(self) -> str:
        kind = "BCa" if self.ci == "bca" else "percentile"
        return f"{kind} bootstrap {self.level:.0%}, paired (questions resampled jointly for both models)"


@dataclass
class NodeEntropy:
    src_names: list[str]
    comparisons: list[S.Comparison]  # one per source node


@dataclass
class PairResult:
    dataset: str
    alpha: str
    objective: str  # the scoring: objective, + method when not eap (layout.scoring)
    text: str  # own | base | tuned: whose answers both models read ("own": each its own)
    granularity: str
    n_layers: int
    n_samples: int
    loss_label: str
    loss: S.Comparison  # the per-sample objective of both models
    loss_relation: dict  # the paired relation of the change in log intensity to the change in log loss
    models: dict[str, str]  # role -> model spec, from the W files' meta
    paired_by: str  # how base and tuned samples were matched
    selection: dict
    comparisons: dict[tuple[str, str, str], S.Comparison]  # (entries, scale, metric) -> comparison
    ranges: dict[tuple[str, str], tuple]  # (entries, scale) -> (base range, tuned range, mode)
    perm_exact: bool
    # relative change, aggregated to (type, layer) nodes, per scale (primary entries mode)
    group_dst: list[str]
    group_src: list[str]
    group_mask: np.ndarray  # bool [n_gdst, n_gsrc]
    mean_abs_base: dict[str, np.ndarray]  # scale -> [n_gdst, n_gsrc]
    mean_abs_tuned: dict[str, np.ndarray]
    aggregated: bool  # True when several edges were summed into one group (head granularity)
    node_entropy: NodeEntropy
    corr_base: np.ndarray  # [n, n] sample correlation, primary entries mode
    corr_tuned: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> dict:
        """The comparison's identity in a CSV row: dataset, alpha, objective, method, text."""
        objective, method = parse_scoring(self.objective)
        return {"dataset": self.dataset, "alpha": self.alpha, "objective": objective, "method": method,
                "text": self.text}

    @property
    def alpha_value(self) -> float:
        return float(self.alpha)

    def rel_change(self, scale: str = "raw") -> np.ndarray:
        return M.relative_change(self.mean_abs_base[scale], self.mean_abs_tuned[scale], self.group_mask)


# ------------------------------------------------------------ node groups
def group_node(name: str) -> str:
    """Node name at (type, layer) resolution: head pieces fold into their q/k/v or block node."""
    kind, layer, rest = parse_node(name)
    if kind == "attn" and rest:
        last = rest.split(".")[-1]
        return f"attn.{layer}.{last}" if last in ("q", "k", "v") else f"attn.{layer}"
    return name


_TYPE_ORDER = {"embed": 0, "attn": 1, "attn.q": 1, "attn.k": 2, "attn.v": 3, "mlp": 4, "logits": 5}


def node_type(group: str) -> str:
    kind, _, rest = parse_node(group)
    return f"{kind}.{rest}" if kind == "attn" and rest else kind


def type_layer_order(groups: list[str]) -> list[int]:
    """Indices that sort group nodes by type (embed, attn[.q/.k/.v], mlp, logits), then layer."""
    def key(i: int):
        _, layer, _ = parse_node(groups[i])
        return (_TYPE_ORDER[node_type(groups[i])], -1 if layer is None else layer)

    return sorted(range(len(groups)), key=key)


def aggregate(A: np.ndarray, dst: list[str], src: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """Sum a [n_dst, n_src] matrix within (type, layer) groups, groups in first-seen order."""
    gd, gs = [group_node(n) for n in dst], [group_node(n) for n in src]
    ud, us = list(dict.fromkeys(gd)), list(dict.fromkeys(gs))
    Pd = np.zeros((len(ud), len(dst)))
    Pd[[ud.index(g) for g in gd], np.arange(len(dst))] = 1
    Ps = np.zeros((len(src), len(us)))
    Ps[np.arange(len(src)), [us.index(g) for g in gs]] = 1
    return Pd @ A @ Ps, ud, us


# ------------------------------------------------------------ the analysis
def _n_layers(pair: PairData) -> int:
    if "n_layers" in pair.base.meta:
        return int(pair.base.meta["n_layers"])
    layers = [parse_node(n)[1] for n in pair.base.src_names]
    return max((l for l in layers if l is not None), default=-1) + 1


def _t_cut(*sources: dict):
    for source in sources:
        for key in ("T_cut", "t_cut", "cut_len"):
            if key in source:
                return source[key]
    return None


def histogram_ranges(Xb: np.ndarray, Xt: np.ndarray, settings: Settings, scale: str) -> tuple:
    """(base range, tuned range, mode) of the Information Complexity histograms of one pair on one scale."""
    mode = settings.range_mode(scale)
    if mode == "fixed":
        return tuple(settings.range), tuple(settings.range), mode
    if mode == "own":
        return M.shared_range(Xb), M.shared_range(Xt), mode
    both = M.shared_range(Xb, Xt)
    return both, both, mode


def unit_mean_abs(W: np.ndarray, mask: np.ndarray, entries: str) -> np.ndarray:
    """[n_dst, n_src] mean over samples of |W| with each sample divided by its own mean |W| over `entries`."""
    size = np.abs(M.select_entries(W, mask, entries)).mean(axis=1)
    return np.abs(np.asarray(W, dtype=np.float64) / np.where(size > 0, size, 1.0)[:, None, None]).mean(axis=0)


def loss_relation(intensity_base: np.ndarray, intensity_tuned: np.ndarray, loss_base: np.ndarray,
                  loss_tuned: np.ndarray, weights: np.ndarray, level: float) -> dict:
    """How much of the intensity change the loss change predicts, paired by question.

    d_I = log(I_tuned / I_base) and d_L = log(L_tuned / L_base) per question; the OLS slope of d_I on
    d_L (with an intercept) and mean d_I, mean d_L, each with a paired-bootstrap percentile CI.
    Slope 1 with a zero intercept: W is proportional to the loss (the NLL gradient saturates as
    1 - p ~ NLL), and the intensity change is the loss change. Needs positive losses (nll).
    """
    nan = float("nan")
    if not (np.all(loss_base > 0) and np.all(loss_tuned > 0) and np.all(intensity_base > 0)
            and np.all(intensity_tuned > 0)):
        return {"defined": False, "note": "needs positive losses and intensities (the nll objective)"}
    dI = np.log(intensity_tuned / intensity_base)
    dL = np.log(loss_tuned / loss_base)

    def fit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted means of d_I and d_L and the weighted OLS slope, for each row of w [B, n]."""
        total = w.sum(1)
        mI, mL = w @ dI / total, w @ dL / total
        cov = w @ (dI * dL) / total - mI * mL
        var = w @ (dL * dL) / total - mL * mL
        with np.errstate(invalid="ignore", divide="ignore"):
            return mI, mL, np.where(var > 0, cov / var, nan)

    (mI,), (mL,), (slope,) = fit(np.ones((1, len(dI))))
    bI, bL, bS = fit(weights)
    ci = lambda v: tuple(map(float, S.percentile_ci(v, level)))  # noqa: E731
    return {"defined": True, "n": len(dI), "mean_dlog_intensity": float(mI), "mean_dlog_intensity_ci": ci(bI),
            "mean_dlog_loss": float(mL), "mean_dlog_loss_ci": ci(bL), "slope": float(slope), "slope_ci": ci(bS),
            "dlog_intensity": dI.tolist(), "dlog_loss": dL.tolist()}


def analyse_pair(pair: PairData, settings: Settings) -> PairResult:
    b, t = pair.base, pair.tuned
    n = b.scores.shape[0]
    mask = b.edge_mask
    rng = np.random.default_rng(settings.seed)
    weights = S.index_weights(S.bootstrap_indices(n, settings.n_boot, rng), n)
    flips, exact = S.sign_flips(n, settings.n_perm, rng)
    spec = settings.spec()

    comparisons, ranges = {}, {}
    corr_base = corr_tuned = intensity = None
    for entries in settings.entries:
        Xb0, Xt0 = M.select_entries(b.scores, mask, entries), M.select_entries(t.scores, mask, entries)
        if intensity is None:
            intensity = (M.intensity_per_sample(Xb0), M.intensity_per_sample(Xt0))
        for scale in settings.scales:
            Xb, Xt = M.scaled(Xb0, scale), M.scaled(Xt0, scale)
            rb, rt, mode = histogram_ranges(Xb, Xt, settings, scale)
            ranges[(entries, scale)] = (rb, rt, mode)
            diversity = S.PairwiseDiversityStatistic(Xb, Xt)
            stats = {
                "activation_intensity": lambda: S.MeanStatistic(M.intensity_per_sample(Xb), M.intensity_per_sample(Xt)),
                "information_complexity": lambda: S.PooledEntropyStatistic(
                    M.sample_histograms(Xb, spec, rb), M.sample_histograms(Xt, spec, rt), spec.log_base, spec.eps,
                    exchangeable=mode != "own"),
                "distribution_kurtosis": lambda: S.MeanStatistic(M.kurtosis_per_sample(Xb), M.kurtosis_per_sample(Xt)),
                "diversity": lambda: diversity,
            }
            for metric in M.SCALED_METRICS[scale]:
                comparisons[(entries, scale, metric)] = S.compare(stats[metric](), weights, flips, exact,
                                                                  settings.level, settings.ci)
            if corr_base is None:
                eye = np.eye(n)
                corr_base, corr_tuned = diversity.Cbb + eye, diversity.Ctt + eye
        del Xb0, Xt0

    # per-node output entropy normalises each sample's |weights|: the same on every scale
    Eb = M.output_entropy_per_source(b.scores, mask, spec.log_base, spec.eps)
    Et = M.output_entropy_per_source(t.scores, mask, spec.log_base, spec.eps)
    node = NodeEntropy(
        list(b.src_names),
        S.compare_all(S.MeanStatistic(Eb, Et), weights, flips, exact, settings.level, settings.ci),
    )

    primary = settings.entries[0]
    per_scale = {"raw": (M.mean_abs(b.scores), M.mean_abs(t.scores)),
                 "unit": (unit_mean_abs(b.scores, mask, primary), unit_mean_abs(t.scores, mask, primary))}
    Ab, At = {}, {}
    for scale in settings.scales:
        Ab[scale], gd, gs = aggregate(per_scale[scale][0], b.dst_names, b.src_names)
        At[scale], _, _ = aggregate(per_scale[scale][1], b.dst_names, b.src_names)
    gmask, _, _ = aggregate(mask.astype(np.float64), b.dst_names, b.src_names)

    objective = str(b.meta.get("objective", "nll"))
    t_cut = _t_cut(pair.selection, b.meta)
    text = {"own": "own answers", "base": "the base model's answers", "tuned": "the tuned model's answers"}[pair.ref.text]
    loss_label = (f"{objective}: {b.meta.get('loss', 'objective not recorded')} (first T_cut={t_cut} tokens of "
                  f"{text})" if t_cut is not None else str(b.meta.get("loss", "loss convention not recorded")))
    return PairResult(
        dataset=pair.ref.dataset,
        alpha=pair.ref.alpha,
        objective=pair.ref.objective,
        text=pair.ref.text,
        granularity=b.granularity,
        n_layers=_n_layers(pair),
        n_samples=n,
        loss_label=loss_label,
        loss=S.compare(S.MeanStatistic(b.loss, t.loss), weights, flips, exact, settings.level, settings.ci),
        loss_relation=loss_relation(intensity[0], intensity[1], np.asarray(b.loss), np.asarray(t.loss), weights,
                                    settings.level),
        models={"base": str(b.meta.get("model", "?")), "tuned": str(t.meta.get("model", "?"))},
        paired_by=pair.paired_by,
        selection=pair.selection,
        comparisons=comparisons,
        ranges=ranges,
        perm_exact=exact,
        group_dst=gd,
        group_src=gs,
        group_mask=gmask > 0,
        mean_abs_base=Ab,
        mean_abs_tuned=At,
        aggregated=len(gd) < len(b.dst_names) or len(gs) < len(b.src_names),
        node_entropy=node,
        corr_base=corr_base,
        corr_tuned=corr_tuned,
    )
