"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

- relative-change heatmap: (mean|W_tuned| - mean|W_base|) / mean|W_base| per edge,
  sources on x and destinations on y, both ordered by (type, layer) so that each
  (source type, destination type) pair is one block; one panel per alpha, one row per scale.
- metrics vs alpha: each metric for base and tuned with 95% CIs, one row per scale (unit first).
- loss relation: per question, log(I_tuned / I_base) against log(L_tuned / L_base).
- diversity: the distribution of pairwise sample correlations for both models, and a
  paired scatter of each question's mean correlation to the other questions
  (base on x, tuned on y: points below the diagonal are questions whose attribution
  pattern became more distinct from the others after tuning).
- per-node output entropy: bars for base and tuned with 95% CIs per source node.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from circuitdiff import metrics as M  # noqa: E402
from circuitdiff.graph import parse_node  # noqa: E402
from circuitdiff.report.compute import PairResult, Settings, node_type, type_layer_order  # noqa: E402

COLORS = {"base": "#4C72B0", "tuned": "#DD8452"}
DPI = 110


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _yerr(values: np.ndarray, cis: np.ndarray) -> np.ndarray:
    """Error-bar lengths from a CI; a bootstrap CI need not contain the point estimate, so clip at 0."""
    err = np.stack([values - cis[:, 0], cis[:, 1] - values])
    return np.nan_to_num(np.clip(err, 0.0, None))


def _axis_labels(groups: list[str], order: list[int], max_labels: int = 45) -> tuple[list[int], list[str], list[float]]:
    """Tick positions/labels (thinned) and the positions of boundaries between node types."""
    types = [node_type(groups[i]) for i in order]
    step = max(1, math.ceil(len(order) / max_labels))
    ticks, labels = [], []
    for pos, i in enumerate(order):
        first_of_type = pos == 0 or types[pos] != types[pos - 1]
        if first_of_type or pos % step == 0:
            _, layer, _ = parse_node(groups[i])
            ticks.append(pos)
            labels.append(types[pos] if layer is None else f"{types[pos]} {layer}")
    bounds = [pos - 0.5 for pos in range(1, len(order)) if types[pos] != types[pos - 1]]
    return ticks, labels, bounds


def heatmap_scale(results: list[PairResult], scale: str = "raw") -> float:
    """One colour scale for every heatmap of the report on `scale`: the 99th percentile of |relative change|."""
    rels = [r.rel_change(scale) for r in results]
    finite = np.concatenate([np.abs(rel[np.isfinite(rel)]) for rel in rels])
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    return vmax if vmax > 0 else 1.0


def relative_change_heatmap(results: list[PairResult], dataset: str, vmax: dict[str, float],
                            scales: tuple[str, ...] = ("raw",)) -> bytes:
    """One panel per alpha and scale of the relative change per edge (aggregated to q/k/v/block nodes at head level)."""
    rs = sorted((r for r in results if r.dataset == dataset), key=lambda r: r.alpha_value)
    first = rs[0]
    dorder, sorder = type_layer_order(first.group_dst), type_layer_order(first.group_src)
    n_d, n_s = len(dorder), len(sorder)
    width = min(6.0, 2.0 + 0.12 * n_s)
    height = min(10.0, 2.0 + 0.1 * n_d)
    fig, axes = plt.subplots(len(scales), len(rs), figsize=(width * len(rs) + 1.2, height * len(scales)), squeeze=False,
                             constrained_layout=True)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")
    for row, scale in enumerate(scales):
        image = None
        for ax, r in zip(axes[row], rs):
            rel = r.rel_change(scale)
            image = ax.imshow(rel[np.ix_(dorder, sorder)], cmap=cmap, vmin=-vmax[scale], vmax=vmax[scale], aspect="auto",
                              interpolation="nearest")
            xt, xl, xb = _axis_labels(r.group_src, sorder)
            yt, yl, yb = _axis_labels(r.group_dst, dorder)
            ax.set_xticks(xt, xl, rotation=90, fontsize=6)
            ax.set_yticks(yt, yl if ax is axes[row][0] else [""] * len(yt), fontsize=6)
            for b in xb:
                ax.axvline(b, color="black", lw=0.6)
            for b in yb:
                ax.axhline(b, color="black", lw=0.6)
            ax.set_title(f"{scale} scale, alpha={r.alpha}  (n={r.n_samples})", fontsize=9)
            ax.set_xlabel("source (type, layer)", fontsize=8)
        axes[row][0].set_ylabel("destination (type, layer)", fontsize=8)
        bar = fig.colorbar(image, ax=axes[row].tolist(), shrink=0.8)
        bar.set_label(f"relative change of mean|W| ({scale}; clipped at ±{vmax[scale]:.3g})", fontsize=8)
    agg = "; heads summed into q/k/v and block nodes" if first.aggregated else ""
    fig.suptitle(
        f"{dataset}: (mean|W_tuned| - mean|W_base|) / mean|W_base| per edge{agg}\n"
        "grey = no edge; colours clipped at the 99th pct of |change| over the whole report, per scale",
        fontsize=9,
    )
    return to_png(fig)


def loss_relation_figure(results: list[PairResult]) -> bytes:
    """One panel per alpha: per question, log(I_tuned / I_base) against log(L_tuned / L_base), with the fit."""
    rs = sorted(results, key=lambda r: r.alpha_value)
    fig, axes = plt.subplots(1, len(rs), figsize=(4.2 * len(rs), 3.8), squeeze=False, constrained_layout=True)
    for ax, r in zip(axes[0], rs):
        rel = r.loss_relation
        x, y = np.array(rel["dlog_loss"]), np.array(rel["dlog_intensity"])
        ax.scatter(x, y, s=16, color="#55A868", edgecolor="none")
        lo, hi = float(min(x.min(), y.min(), 0.0)), float(max(x.max(), y.max(), 0.0))
        grid = np.linspace(lo, hi, 50)
        ax.plot(grid, grid, ls="--", color="grey", lw=0.8, label="slope 1 through 0")
        if np.isfinite(rel["slope"]):
            ax.plot(grid, rel["mean_dlog_intensity"] + rel["slope"] * (grid - rel["mean_dlog_loss"]), color="black",
                    lw=1.0, label=f"fit: slope {rel['slope']:.2f} [{rel['slope_ci'][0]:.2f}, {rel['slope_ci'][1]:.2f}]")
        ax.axhline(0, color="black", lw=0.4)
        ax.axvline(0, color="black", lw=0.4)
        ax.set_xlabel("log(L_tuned / L_base)", fontsize=8)
        ax.set_ylabel("log(I_tuned / I_base)", fontsize=8)
        ax.set_title(f"{r.dataset}, alpha={r.alpha}, objective {r.objective} (n={r.n_samples})", fontsize=9)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    return to_png(fig)


def metrics_vs_alpha(results: list[PairResult], dataset: str, settings: Settings) -> bytes:
    rs = sorted((r for r in results if r.dataset == dataset), key=lambda r: r.alpha_value)
    pos = np.arange(len(rs), dtype=np.float64)  # alphas as evenly spaced categories
    entries = settings.entries[0]
    n_rows, n_cols = len(settings.scales), len(M.METRICS)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.3 * n_cols, 2.7 * n_rows), squeeze=False, constrained_layout=True)
    legend = True
    for i, scale in enumerate(settings.scales):
        for j, metric in enumerate(M.METRICS):
            ax = axes[i][j]
            if metric not in M.SCALED_METRICS[scale]:
                ax.text(0.5, 0.5, f"{M.METRIC_LABELS[metric]}\non the {scale} scale:\n1 by construction", ha="center",
                        va="center", fontsize=9, transform=ax.transAxes)
                ax.set_axis_off()
                continue
            comps = [r.comparisons[(entries, scale, metric)] for r in rs]
            for k, role in enumerate(("base", "tuned")):
                vals = np.array([getattr(c, role) for c in comps])
                cis = np.array([getattr(c, f"{role}_ci") for c in comps])
                ax.errorbar(pos + (k - 0.5) * 0.12, vals, yerr=_yerr(vals, cis), marker="o", ms=4, capsize=3,
                            color=COLORS[role], label=role)  # fmt: skip
            top = ax.get_ylim()[1]
            for p, c in zip(pos, comps):
                if c.arrow:
                    ax.annotate("*", (p, top), ha="center", va="top", fontsize=12)
            ax.set_xticks(pos, [r.alpha for r in rs])
            ax.set_xlim(-0.5, len(rs) - 0.5)
            ax.set_title(f"{M.METRIC_LABELS[metric]}  [{scale} scale]", fontsize=9)
            ax.set_xlabel("alpha (T_cut / T_bar)", fontsize=8)
            ax.tick_params(labelsize=7)
            if legend:
                ax.legend(fontsize=7)
                legend = False
    fig.suptitle(
        f"{dataset}: metrics vs alpha, entries={entries}, {settings.level:.0%} paired-bootstrap CIs; * = CI of tuned - "
        f"base excludes 0 (entropy: {settings.bins} bins, {settings.range_label}, log base {settings.log_base})",
        fontsize=10,
    )
    return to_png(fig)


def diversity_figure(result: PairResult, entries: str) -> bytes:
    r = result
    n = r.n_samples
    iu = np.triu_indices(n, k=1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    pair_b, pair_t = r.corr_base[iu], r.corr_tuned[iu]
    lo = float(np.nanmin([pair_b.min(), pair_t.min()]))
    bins = np.linspace(min(lo, 0.0), 1.0, 41)
    for role, vals in (("base", pair_b), ("tuned", pair_t)):
        ax1.hist(vals, bins=bins, alpha=0.55, color=COLORS[role],
                 label=f"{role}: mean r={np.mean(vals):.3f}, diversity={1 - np.mean(vals):.3f}")  # fmt: skip
    ax1.set_xlabel("Pearson r between two questions' W", fontsize=8)
    ax1.set_ylabel("question pairs", fontsize=8)
    ax1.legend(fontsize=7)
    ax1.set_title(f"pairwise correlations ({len(pair_b)} pairs)", fontsize=9)
    mean_b = (r.corr_base.sum(1) - np.diag(r.corr_base)) / (n - 1)
    mean_t = (r.corr_tuned.sum(1) - np.diag(r.corr_tuned)) / (n - 1)
    ax2.scatter(mean_b, mean_t, s=14, alpha=0.7, color="#55A868", edgecolor="none")
    lims = [min(mean_b.min(), mean_t.min()), max(mean_b.max(), mean_t.max())]
    pad = 0.05 * (lims[1] - lims[0] or 1.0)
    lims = [lims[0] - pad, lims[1] + pad]
    ax2.plot(lims, lims, color="black", lw=0.8)
    ax2.set_xlim(lims)
    ax2.set_ylim(lims)
    below = int(np.sum(mean_t < mean_b))
    ax2.set_xlabel("base: mean r to the other questions", fontsize=8)
    ax2.set_ylabel("tuned: mean r to the other questions", fontsize=8)
    ax2.set_title(f"one point per question; {below}/{n} below the diagonal (more distinct when tuned)", fontsize=9)
    fig.suptitle(f"{r.dataset}, alpha={r.alpha}: diversity across samples [entries={entries}]", fontsize=10)
    return to_png(fig)


def node_entropy_figure(result: PairResult, settings: Settings, max_bars: int = 64) -> bytes:
    """Top: entropy per source node for both models (bars, or lines with CI bands for many nodes).
    Bottom: tuned - base per node with its CI; nodes whose CI excludes 0 in red/blue."""
    node = result.node_entropy
    names, comps = node.src_names, node.comparisons
    x = np.arange(len(names))
    many = len(names) > max_bars
    width_in = 14.0 if many else min(14.0, max(7.0, 2.0 + 0.22 * len(names)))
    fig, (ax, axd) = plt.subplots(2, 1, figsize=(width_in, 5.6), sharex=True, height_ratios=[3, 2], constrained_layout=True)
    for k, role in enumerate(("base", "tuned")):
        vals = np.array([getattr(c, role) for c in comps])
        cis = np.array([getattr(c, f"{role}_ci") for c in comps])
        if many:
            ax.plot(x, vals, color=COLORS[role], lw=0.9, label=role)
            ax.fill_between(x, cis[:, 0], cis[:, 1], color=COLORS[role], alpha=0.25, lw=0)
        else:
            ax.bar(x + (k - 0.5) * 0.4, vals, 0.4, yerr=_yerr(vals, cis), color=COLORS[role], label=role,
                   error_kw={"elinewidth": 0.7, "capsize": 1.5})  # fmt: skip
    ax.set_ylabel(f"entropy (log base {settings.log_base})", fontsize=8)
    ax.legend(fontsize=7)
    diff = np.array([c.diff for c in comps])
    dci = np.array([c.diff_ci for c in comps])
    colors = ["#b42318" if c.arrow == "up" else "#1f4e99" if c.arrow == "down" else "#888888" for c in comps]
    axd.axhline(0.0, color="black", lw=0.7)
    axd.errorbar(x, diff, yerr=_yerr(diff, dci), fmt="none", ecolor=colors, elinewidth=0.8)
    axd.scatter(x, diff, c=colors, s=8 if many else 14, zorder=3)
    axd.set_ylabel("tuned - base", fontsize=8)
    n_sig = sum(1 for c in comps if c.arrow)
    axd.set_title(f"{n_sig}/{len(comps)} nodes with a {settings.level:.0%} CI excluding 0 (coloured; not corrected "
                  "for multiple comparisons)", fontsize=8)  # fmt: skip
    step = max(1, math.ceil(len(names) / 70))
    axd.set_xticks(x[::step], names[::step], rotation=90, fontsize=6)
    axd.set_xlim(-0.7, len(names) - 0.3)
    for a in (ax, axd):
        a.tick_params(labelsize=7)
    ax.set_title(
        f"{result.dataset}, alpha={result.alpha}: entropy of each source node's normalised |outgoing edge weights|, "
        f"mean over {result.n_samples} questions, {settings.level:.0%} CIs",
        fontsize=9,
    )
    return to_png(fig)
