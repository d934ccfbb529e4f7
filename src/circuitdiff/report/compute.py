"""Everything the report shows about one (dataset, alpha) pair, computed once from the two W files.

`analyse_pair` keeps only small summaries (metric comparisons, aggregated mean |W|,
per-node entropies, the correlation matrices of the primary `entries` mode), so the W
matrices of one pair can be dropped before the next is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from circuitdiff import metrics as M
from circuitdiff import stats as S
from circuitdiff.graph import parse_node
from circuitdiff.report.pairs import PairData


@dataclass(frozen=True)
class Settings:
    """The report's conventions; every output names them."""

    entries: tuple[str, ...] = ("all", "edges")  # the first is the primary mode (figures)
    bins: int = 100
    range: tuple[float, float] | None = None  # None: shared [0, max |W| over base and tuned] per pair and mode
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
        if self.n_boot < 100 or self.n_perm < 100:
            raise ValueError(f"n_boot={self.n_boot} and n_perm={self.n_perm} must be at least 100")
        if self.ci not in S.CI_METHODS:
            raise ValueError(f"ci {self.ci!r} is unknown; use one of {', '.join(S.CI_METHODS)}")
        if not 0 < self.level < 1:
            raise ValueError(f"level={self.level} must be in (0, 1)")
        M.HistogramSpec(self.bins, self.range, self.log_base, self.eps)  # validates

    def spec(self) -> M.HistogramSpec:
        return M.HistogramSpec(self.bins, self.range, self.log_base, self.eps)

    @property
    def range_label(self) -> str:
        return "shared [0, max|W| of base and tuned]" if self.range is None else f"fixed [{self.range[0]:g}, {self.range[1]:g}]"

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
    granularity: str
    n_layers: int
    n_samples: int
    loss_label: str
    loss_mean: dict[str, float]
    models: dict[str, str]  # role -> model spec, from the W files' meta
    paired_by: str  # how base and tuned samples were matched
    selection: dict
    comparisons: dict[tuple[str, str], S.Comparison]  # (entries, metric) -> comparison
    ranges: dict[str, tuple[float, float]]  # entries -> histogram range used
    perm_exact: bool
    # relative change, aggregated to (type, layer) nodes
    group_dst: list[str]
    group_src: list[str]
    group_mask: np.ndarray  # bool [n_gdst, n_gsrc]
    mean_abs_base: np.ndarray  # [n_gdst, n_gsrc]
    mean_abs_tuned: np.ndarray
    aggregated: bool  # True when several edges were summed into one group (head granularity)
    node_entropy: NodeEntropy
    corr_base: np.ndarray  # [n, n] sample correlation, primary entries mode
    corr_tuned: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def alpha_value(self) -> float:
        return float(self.alpha)

    @property
    def rel_change(self) -> np.ndarray:
        return M.relative_change(self.mean_abs_base, self.mean_abs_tuned, self.group_mask)


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


def analyse_pair(pair: PairData, settings: Settings) -> PairResult:
    b, t = pair.base, pair.tuned
    n = b.scores.shape[0]
    mask = b.edge_mask
    rng = np.random.default_rng(settings.seed)
    weights = S.index_weights(S.bootstrap_indices(n, settings.n_boot, rng), n)
    flips, exact = S.sign_flips(n, settings.n_perm, rng)
    spec = settings.spec()

    comparisons, ranges = {}, {}
    corr_base = corr_tuned = None
    for entries in settings.entries:
        Xb, Xt = M.select_entries(b.scores, mask, entries), M.select_entries(t.scores, mask, entries)
        value_range = settings.range or M.shared_range(Xb, Xt)
        ranges[entries] = value_range
        diversity = S.PairwiseDiversityStatistic(Xb, Xt)
        stats = {
            "activation_intensity": S.MeanStatistic(M.intensity_per_sample(Xb), M.intensity_per_sample(Xt)),
            "information_complexity": S.PooledEntropyStatistic(
                M.sample_histograms(Xb, spec, value_range), M.sample_histograms(Xt, spec, value_range), spec.log_base, spec.eps
            ),
            "distribution_kurtosis": S.MeanStatistic(M.kurtosis_per_sample(Xb), M.kurtosis_per_sample(Xt)),
            "diversity": diversity,
        }
        for metric, stat in stats.items():
            comparisons[(entries, metric)] = S.compare(stat, weights, flips, exact, settings.level, settings.ci)
        if corr_base is None:
            eye = np.eye(n)
            corr_base, corr_tuned = diversity.Cbb + eye, diversity.Ctt + eye
        del Xb, Xt

    Eb = M.output_entropy_per_source(b.scores, mask, spec.log_base, spec.eps)
    Et = M.output_entropy_per_source(t.scores, mask, spec.log_base, spec.eps)
    node = NodeEntropy(
        list(b.src_names),
        S.compare_all(S.MeanStatistic(Eb, Et), weights, flips, exact, settings.level, settings.ci),
    )

    Ab, gd, gs = aggregate(M.mean_abs(b.scores), b.dst_names, b.src_names)
    At, _, _ = aggregate(M.mean_abs(t.scores), b.dst_names, b.src_names)
    gmask, _, _ = aggregate(mask.astype(np.float64), b.dst_names, b.src_names)

    t_cut = _t_cut(pair.selection, b.meta)
    loss_conv = b.meta.get("loss", "loss convention not recorded")
    loss_label = f"own-answer NLL, first T_cut={t_cut} tokens" if t_cut is not None else str(loss_conv)
    return PairResult(
        dataset=pair.ref.dataset,
        alpha=pair.ref.alpha,
        granularity=b.granularity,
        n_layers=_n_layers(pair),
        n_samples=n,
        loss_label=loss_label,
        loss_mean={"base": float(np.mean(b.loss)), "tuned": float(np.mean(t.loss))},
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
