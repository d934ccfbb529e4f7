"""The report's sections. To add one, write ``def my_section(ctx: ReportContext) -> list[Section]``
(return [] when the run has nothing for it) and append it to ``SECTION_BUILDERS``.

A builder may read anything under ``ctx.run_dir``; every `Figure` it returns is written to
``ctx.out_dir/<filename>`` and embedded in report.html.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from circuitdiff.report import figures, tables
from circuitdiff.report.accuracy import accuracy_section
from circuitdiff.report.compute import PairResult, Settings
from circuitdiff.report.html import Figure, Section, Table
from circuitdiff.choices import SCALES
from circuitdiff.report.pairs import RunIndex, scoring_order
from circuitdiff.report.validation import validation_section
from circuitdiff.report.features import features_section


@dataclass
class ReportContext:
    run_dir: Path
    out_dir: Path
    settings: Settings
    index: RunIndex
    results: list[PairResult]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (dataset, alpha, reason)

    @property
    def primary(self) -> list[PairResult]:
        """The comparisons the figures show: each model on its own text, the first objective (nll when present)."""
        objectives = sorted({r.objective for r in self.results}, key=scoring_order)
        own = [r for r in self.results if r.text == "own" and r.objective == objectives[0]]
        return own or [r for r in self.results if r.objective == objectives[0]]

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.primary))

    def reference(self, dataset: str) -> PairResult:
        """The dataset's primary result at the alpha closest to settings.ref_alpha."""
        rs = [r for r in self.primary if r.dataset == dataset]
        return min(rs, key=lambda r: (abs(r.alpha_value - self.settings.ref_alpha), r.alpha_value))


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in text)


# ---------------------------------------------------------------- builders
def conventions_section(ctx: ReportContext) -> list[Section]:
    s = ctx.settings
    grans = sorted({r.granularity for r in ctx.results})
    rows = [
        ["granularity", ", ".join(grans)],
        ["entries", f"{', '.join(s.entries)} (figures use '{s.entries[0]}'); all = every n_dst x n_src entry of W, "
                    "structural zeros included (paper-compatible); edges = only real edges (edge_mask)"],
        ["scales", "; ".join(f"{sc}: {SCALES[sc]}" for sc in s.scales) + ". Kurtosis, Diversity and the node entropy "
                   "do not change when a sample's W is multiplied by a constant: their two scales agree; Information "
                   "Complexity does change, and the unit scale removes the size of W from it"],
        ["text", "own: each model scored on its own answers (the paper's); same text (base / tuned): both models on "
                 "identical tokens, one model's answers, when the run computed them (config text)"],
        ["Activation Intensity", "mean over samples and entries of |W|"],
        ["Information Complexity", f"entropy of ONE histogram of |W| pooled over all samples; {s.bins} equal-width bins, "
                                   f"range {s.range_label}, per scale (values outside are clipped into the end bins), "
                                   f"-sum p log(p + eps) with eps={s.eps:g}, log base {s.log_base}"],
        ["Distribution Kurtosis", "mean over samples of the excess (Fisher) kurtosis of the signed entries of W^(k), biased moments"],
        ["Diversity", "1 - mean Pearson correlation of the flattened signed W over all pairs of distinct samples"],
        ["output-edge entropy", f"per source node and sample: entropy (log base {s.log_base}) of its |outgoing edge weights| "
                                "normalised to 1; real edges only (identical in both entries modes); mean over samples"],
        ["relative change", "(mean|W_tuned| - mean|W_base|) / mean|W_base| per edge; at head granularity heads are summed "
                            "into their q/k/v (destinations) or block (sources) node first"],
        ["CIs", f"{s.ci_method}; {s.n_boot} resamples; Information Complexity recomputes the pooled histogram of each "
                "resample (same bins); Diversity leaves out pairs of two draws of the same question"],
        ["tests", f"two-sided paired sign-flip permutation test of tuned - base (swap the two models' matrices of a "
                  f"question), {s.n_perm} random flips or all 2^n when fewer; Wilcoxon signed-rank and Cohen's d_z on "
                  "per-sample values for the metrics that are means of per-sample values (not Information Complexity); "
                  "p_perm_holm in metrics.csv: Holm over every diff row"],
        ["arrows", "↑/↓ only where the CI of tuned - base excludes 0"],
        ["seed", str(s.seed)],
        ["loss", "; ".join(sorted({r.loss_label for r in ctx.results}))],
    ]  # fmt: skip
    models = sorted({(r.models["base"], r.models["tuned"]) for r in ctx.results})
    for base, tuned in models:
        rows.insert(0, ["models", f"base = {base}; tuned = {tuned}"])
    return [Section("Conventions", "Every number in this report was produced with these conventions.", [Table(["convention", "value"], rows)])]


def _tables(ctx: ReportContext, own: bool) -> list:
    header = tables.table_header(ctx.settings)
    return [Table(header, rows, caption=tables.block_title(key))
            for key, rows, _ in tables.table_groups(ctx.results, ctx.settings) if (key[1] == "own") == own]


def summary_section(ctx: ReportContext) -> list[Section]:
    text = (
        "Layout of the paper's Table 1, one column per scale (unit first: it removes the size of W, which follows the "
        "loss gradient): base → tuned, the difference tuned - base with its 95% paired-bootstrap CI and relative size, "
        "and the paired permutation p-value (uncorrected; Holm-adjusted values are in metrics.csv). An arrow marks a "
        "change whose CI excludes 0.\n\n" + tables.conventions_line(ctx.results, ctx.settings)
    )
    return [Section("Summary table", text, _tables(ctx, own=True))]


def same_text_section(ctx: ReportContext) -> list[Section]:
    blocks = _tables(ctx, own=False)
    if not blocks:
        return []
    text = ("Both models scored on identical tokens (one model's answers), so the difference is the models' alone; "
            "beside the own-text table above, where each model reads its own answer and the texts differ too.")
    return [Section("Same text", text, blocks)]


def loss_section(ctx: ReportContext) -> list[Section]:
    """The objective of both models, and how much of the intensity change the loss change predicts."""
    header = ["dataset", "alpha", "objective", "text", "mean loss base → tuned; Δ [95% CI]", "mean Δlog intensity [CI]",
              "mean Δlog loss [CI]", "slope of Δlog intensity on Δlog loss [CI]", "n"]
    rows, figures_in = [], []
    for r in ctx.results:
        c, rel = r.loss, r.loss_relation
        loss = f"{tables.fmt(c.base)} → {tables.fmt(c.tuned)}; Δ {tables.fmt(c.diff)} [{tables.fmt(c.diff_ci[0])}, {tables.fmt(c.diff_ci[1])}]"
        if rel.get("defined"):
            ci = lambda key: f"{tables.fmt(rel[key])} [{tables.fmt(rel[key + '_ci'][0])}, {tables.fmt(rel[key + '_ci'][1])}]"  # noqa: E731
            rows.append([r.dataset, r.alpha, r.objective, r.text, loss, ci("mean_dlog_intensity"), ci("mean_dlog_loss"),
                         ci("slope"), str(r.n_samples)])
            if any(r is p for p in ctx.primary):
                figures_in.append(r)
        else:
            rows.append([r.dataset, r.alpha, r.objective, r.text, loss, "", "", rel.get("note", ""), str(r.n_samples)])
    blocks = [Table(header, rows)]
    for d in dict.fromkeys(r.dataset for r in figures_in):
        blocks.append(Figure(figures.loss_relation_figure([r for r in figures_in if r.dataset == d]),
                             f"{d}: per question, log(I_tuned / I_base) (raw Activation Intensity, entries "
                             f"{ctx.settings.entries[0]}) against log(L_tuned / L_base), with the least-squares line; "
                             "the dashed line is slope 1 through 0 (W proportional to the loss).",
                             f"fig_loss_relation_{safe_name(d)}.png"))
    text = ("W is linear in the gradient of the objective. The NLL saturates as a model grows sure of its answer "
            "(its gradient shrinks like 1 - p, about the NLL itself), so a surer model gets smaller |W| everywhere. "
            "Per question, Δlog = log(tuned / base); the slope of Δlog intensity on Δlog loss (least squares with an "
            "intercept, paired-bootstrap CI) near 1 says the intensity change is mostly the loss change; the unit scale "
            "and the logit objective are the controls for it (tables above). Loss = the objective of each row (logit: minus the centred "
            "logit, which can be negative, so no log relation).")
    return [Section("Loss and scale", text, blocks)]


def alpha_section(ctx: ReportContext) -> list[Section]:
    blocks = [
        Figure(figures.metrics_vs_alpha(ctx.primary, d, ctx.settings), f"{d}: the metrics vs alpha for base and tuned, "
               f"95% CIs, entries {ctx.settings.entries[0]}; one row per scale (unit first).",
               f"fig_metrics_vs_alpha_{safe_name(d)}.png")
        for d in ctx.datasets
    ]  # fmt: skip
    return [Section("Metrics vs alpha", "alpha is the fraction of the mean answer length kept for the loss (T_cut = alpha * T_bar).", blocks)]


def heatmap_section(ctx: ReportContext) -> list[Section]:
    scales = ctx.settings.scales
    vmax = {scale: figures.heatmap_scale(ctx.primary, scale) for scale in scales}
    blocks = [
        Figure(figures.relative_change_heatmap(ctx.primary, d, vmax, scales), f"{d}: relative change of mean |W| per edge "
               "(red = stronger in the tuned model), one row per scale (unit: each sample's W divided by its mean |W|, "
               "so an edge gains only by taking a larger share); nodes ordered by type then layer; grey = impossible "
               "edge; one colour scale per scale for all datasets.", f"fig_relative_change_{safe_name(d)}.png")
        for d in ctx.datasets
    ]  # fmt: skip
    return [Section("Relative change per edge", "Per-edge numbers are in edge_change.csv.", blocks)]


def diversity_section(ctx: ReportContext) -> list[Section]:
    entries = ctx.settings.entries[0]
    blocks = []
    for d in ctx.datasets:
        r = ctx.reference(d)
        blocks.append(Figure(figures.diversity_figure(r, entries), f"{d}, alpha={r.alpha}: left, the distribution of the "
                             "Pearson correlation between two questions' W for each model; right, each question's mean "
                             "correlation to the others, base vs tuned.",
                             f"fig_diversity_{safe_name(d)}_alpha={safe_name(r.alpha)}.png"))  # fmt: skip
    text = (f"Diversity = 1 - mean pairwise correlation (entries = {entries}). A lower correlation means the questions use "
            "more different circuits. Shown at the alpha closest to " + f"{ctx.settings.ref_alpha:g}.")  # fmt: skip
    return [Section("Diversity across samples", text, blocks)]


def node_entropy_section(ctx: ReportContext) -> list[Section]:
    blocks = []
    for d in ctx.datasets:
        r = ctx.reference(d)
        blocks.append(Figure(figures.node_entropy_figure(r, ctx.settings), f"{d}, alpha={r.alpha}: output-edge entropy per "
                             "source node (higher = the node spreads its influence over more destinations).",
                             f"fig_node_entropy_{safe_name(d)}_alpha={safe_name(r.alpha)}.png"))  # fmt: skip
    return [Section("Output-edge entropy per source node", "Per-node numbers for every alpha are in node_entropy.csv.", blocks)]


def samples_section(ctx: ReportContext) -> list[Section]:
    header = ["dataset", "alpha", "objective", "n", "paired by", "granularity", "mean loss base", "mean loss tuned",
              "selection"]
    rows = []
    for r in [r for r in ctx.results if r.text == "own"]:
        sel = {k: v for k, v in r.selection.items() if isinstance(v, (int, float, str, bool)) or v is None}
        for group in ("counts", "settings"):  # filter counts and selection settings, one level deep
            if isinstance(r.selection.get(group), dict):
                sel.update({f"{group}.{k}": v for k, v in r.selection[group].items() if not isinstance(v, (dict, list))})
        rows.append([r.dataset, r.alpha, r.objective, str(r.n_samples), r.paired_by, r.granularity, tables.fmt(r.loss.base),
                     tables.fmt(r.loss.tuned), ", ".join(f"{k}={v}" for k, v in sorted(sel.items()))])  # fmt: skip
    return [Section("Samples", "The questions both models answered correctly, selected per dataset and alpha.", [Table(header, rows)])]


def _flatten(obj, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict) and obj:
        out = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    text = json.dumps(obj, default=str)
    return [(prefix, text if len(text) <= 300 else text[:297] + "...")]


VOLATILE = ("started", "updated", "timings")  # when and how long: in manifest.json, not in the report


def manifest_section(ctx: ReportContext) -> list[Section]:
    if not ctx.index.manifest:
        return []
    kept = {k: v for k, v in ctx.index.manifest.items() if k not in VOLATILE}
    return [Section("Run manifest", "manifest.json of the run, flattened (without its timestamps and timings, so that "
                    "the same results give the same report).", [Table(["key", "value"], [list(kv) for kv in _flatten(kept)])])]


def skipped_section(ctx: ReportContext) -> list[Section]:
    if not ctx.skipped:
        return []
    rows = [[d, a, why] for d, a, why in ctx.skipped]
    return [Section("Skipped", "These (dataset, alpha) pairs are in the run directory but could not be compared.", [Table(["dataset", "alpha", "reason"], rows)])]


SECTION_BUILDERS: list[Callable[[ReportContext], list[Section]]] = [
    conventions_section,
    accuracy_section,
    summary_section,
    same_text_section,
    loss_section,
    alpha_section,
    heatmap_section,
    diversity_section,
    node_entropy_section,
    samples_section,
    validation_section,
    features_section,
    manifest_section,
    skipped_section,
]
