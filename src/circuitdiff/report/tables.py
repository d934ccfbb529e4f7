"""metrics.csv, table.md and table.tex from the comparison results.

metrics.csv has one row per (dataset, alpha, objective, text, entries, scale, metric, role),
role in base / tuned / diff (tuned - base), with the 95% CI and every convention that produced
the number (the histogram range in `range`). Tests and effect sizes fill the diff rows.
p_perm_holm is Holm-adjusted over every diff row of the report.

The tables follow the paper's Table 1: rows dataset x metric, one column per scale (unit first),
"base -> tuned" with an arrow only where the 95% CI of the difference excludes 0; one table per
(objective, text, entries mode, alpha), own text first.
"""

from __future__ import annotations

import csv
import io as _io
import math

from circuitdiff import metrics as M
from circuitdiff import stats as S
from circuitdiff.choices import SCALES
from circuitdiff.report.compute import PairResult, Settings
from circuitdiff.report.pairs import scoring_order
from circuitdiff.store.layout import parse_scoring

CSV_COLUMNS = [
    "dataset", "alpha", "objective", "method", "text", "metric", "scale", "role", "value", "ci_low", "ci_high",
    "p_perm", "p_perm_holm", "perm_exact", "p_wilcoxon", "cohen_dz", "rel_diff", "arrow",
    "granularity", "entries", "bins", "range", "log_base", "eps", "loss",
    "n_samples", "n_boot", "n_perm", "seed", "ci_method",
]  # fmt: skip

ARROWS = {"up": ("↑", r"$\uparrow$"), "down": ("↓", r"$\downarrow$"), "": ("", "")}
TEXT_TITLES = {
    "own": "each model on its own answers",
    "base": "same text: both models on the base model's answers",
    "tuned": "same text: both models on the tuned model's answers",
}


def fmt(x: float) -> str:
    """Three significant digits, paper style: 1.10e-3, 0.247, 357."""
    if x is None or not math.isfinite(x):
        return "nan" if x is None or math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    if 1e-2 <= abs(x) < 1e4:
        digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
        return f"{x:.{digits}f}"
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exp)}"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<1e-4" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def range_text(ranges: tuple) -> str:
    """The histogram range(s) of one (entries, scale): "[lo, hi] shared|fixed" or "base [..], tuned [..] own"."""
    rb, rt, mode = ranges
    if mode == "own":
        return f"base [{rb[0]:.6g}, {rb[1]:.6g}], tuned [{rt[0]:.6g}, {rt[1]:.6g}] own"
    return f"[{rb[0]:.6g}, {rb[1]:.6g}] {mode}"


def comparison_key(res: PairResult) -> tuple:
    return (res.dataset, res.alpha, res.objective, res.text)


def diff_rows_in_order(results: list[PairResult], settings: Settings) -> list[tuple[PairResult, str, str, str, S.Comparison]]:
    return [
        (res, entries, scale, metric, res.comparisons[(entries, scale, metric)])
        for res in results
        for entries in settings.entries
        for scale in settings.scales
        for metric in M.SCALED_METRICS[scale]
    ]


def holm_adjusted(results: list[PairResult], settings: Settings) -> dict[tuple, float]:
    """Holm over every distinct test of the report. Kurtosis and Diversity do not depend on a sample's scale, so
    their unit-scale rows repeat the raw test: they take the raw row's adjusted p and are not counted twice."""
    items = diff_rows_in_order(results, settings)
    twin = lambda sc, m: sc == "unit" and m in M.SCALE_FREE and "raw" in settings.scales  # noqa: E731
    family = [(r, e, sc, m, c) for r, e, sc, m, c in items if not twin(sc, m)]
    adjusted = dict(zip([(*comparison_key(r), e, sc, m) for r, e, sc, m, _ in family], S.holm([c.p_perm for *_, c in family])))
    for r, e, sc, m, _ in items:
        if twin(sc, m):
            adjusted[(*comparison_key(r), e, sc, m)] = adjusted[(*comparison_key(r), e, "raw", m)]
    return adjusted


def csv_rows(results: list[PairResult], settings: Settings) -> list[dict]:
    holm = holm_adjusted(results, settings)
    rows = []
    for res, entries, scale, metric, c in diff_rows_in_order(results, settings):
        common = {
            **res.columns, "metric": metric, "scale": scale,
            "granularity": res.granularity, "entries": entries, "bins": settings.bins,
            "range": range_text(res.ranges[(entries, scale)]), "log_base": settings.log_base,
            "eps": settings.eps, "loss": res.loss_label, "n_samples": c.n_samples,
            "n_boot": c.n_boot, "n_perm": "all 2^n flips" if c.perm_exact else c.n_perm,
            "seed": settings.seed, "ci_method": settings.ci_method,
        }  # fmt: skip
        for role, value, ci in (("base", c.base, c.base_ci), ("tuned", c.tuned, c.tuned_ci), ("diff", c.diff, c.diff_ci)):
            row = dict(common, role=role, value=value, ci_low=ci[0], ci_high=ci[1])
            if role == "diff":
                row.update(
                    p_perm=c.p_perm, p_perm_holm=holm[(*comparison_key(res), entries, scale, metric)],
                    perm_exact=c.perm_exact, p_wilcoxon=c.p_wilcoxon, cohen_dz=c.cohen_dz,
                    rel_diff=c.rel_diff, arrow=c.arrow,
                )  # fmt: skip
            rows.append(row)
    return rows


def to_csv(rows: list[dict], columns: list[str] = CSV_COLUMNS) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k, "")) for k in columns})
    return buf.getvalue()


# ------------------------------------------------------------ Table 1 layout, the scales side by side
def table_header(settings: Settings) -> list[str]:
    return ["Dataset", "Metric"] + [f"{scale} scale: base → tuned; Δ [95% CI]; p" for scale in settings.scales] + ["n"]


def _cell(c: S.Comparison | None, tex: bool) -> str:
    """One scale's cell: base -> tuned (arrow), the difference with its CI and relative size, the p-value."""
    if c is None:
        return "1 (by construction)"
    esc = latex_escape if tex else (lambda x: x)
    arrow = ARROWS[c.arrow][1 if tex else 0]
    to, delta = (r"$\to$", r"$\Delta$") if tex else ("→", "Δ")
    rel = esc(f" ({100 * c.rel_diff:+.1f}%)") if math.isfinite(c.rel_diff) else ""
    return (f"{fmt(c.base)} {to} {fmt(c.tuned)} {arrow}".rstrip()
            + f"; {delta} {fmt(c.diff)} [{fmt(c.diff_ci[0])}, {fmt(c.diff_ci[1])}]{rel}; p {esc(fmt_p(c.p_perm))}")


def table_groups(results: list[PairResult], settings: Settings) -> list[tuple[tuple, list[list[str]], list[list[str]]]]:
    """[((objective, text, entries, alpha), rows_text, rows_tex)]: one Table-1 block each, scales as columns."""
    groups = []
    blocks = sorted({(r.objective, r.text, r.alpha_value, r.alpha) for r in results},
                    key=lambda b: (scoring_order(b[0]), list(TEXT_TITLES).index(b[1]), b[2]))
    for objective, text, _, alpha in blocks:
        for entries in settings.entries:
            text_rows, tex_rows = [], []
            for res in [r for r in results if (r.objective, r.text, r.alpha) == (objective, text, alpha)]:
                for i, metric in enumerate(M.METRICS):
                    cells = [res.comparisons.get((entries, scale, metric)) for scale in settings.scales]
                    dataset = res.dataset if i == 0 else ""
                    text_rows.append([dataset, M.METRIC_LABELS[metric]] + [_cell(c, False) for c in cells]
                                     + [str(res.n_samples)])
                    tex_rows.append([latex_escape(dataset), M.METRIC_LABELS[metric]] + [_cell(c, True) for c in cells]
                                    + [str(res.n_samples)])
            if text_rows:
                groups.append(((objective, text, entries, alpha), text_rows, tex_rows))
    return groups


def block_title(key: tuple) -> str:
    scoring, text, entries, alpha = key
    objective, method = parse_scoring(scoring)
    return f"{TEXT_TITLES[text]}; objective = {objective}, method = {method}, entries = {entries}, alpha = {alpha}"


def conventions_line(results: list[PairResult], settings: Settings) -> str:
    grans = sorted({r.granularity for r in results})
    losses = sorted({r.loss_label for r in results})
    return (
        f"granularity={'/'.join(grans)}; scales: {', '.join(f'{s} = {SCALES[s]}' for s in settings.scales)}; "
        f"histogram: bins={settings.bins}, range={settings.range_label}, log base={settings.log_base}, "
        f"eps={settings.eps:g}; kurtosis: excess (Fisher), of signed W, biased moments; "
        f"CI: {settings.ci_method}, n_boot={settings.n_boot}; p: two-sided paired sign-flip permutation test "
        f"(n_perm={settings.n_perm}, or all 2^n flips when fewer; not defined with own ranges); seed={settings.seed}; "
        f"objective: {'; '.join(losses)}; arrows only where the CI of tuned - base excludes 0."
    )


def markdown(results: list[PairResult], settings: Settings) -> str:
    out = ["# Base vs tuned circuit metrics (layout of the paper's Table 1, the scales side by side)", "",
           conventions_line(results, settings), ""]
    header = table_header(settings)
    for key, rows, _ in table_groups(results, settings):
        out += [f"## {block_title(key)}", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "<": r"\textless{}",
                  ">": r"\textgreater{}"}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex(results: list[PairResult], settings: Settings) -> str:
    out = [
        "% circuitdiff report tables (needs \\usepackage{booktabs})",
        f"% {latex_escape(conventions_line(results, settings))}",
    ]
    columns = "ll" + "p{0.3\\linewidth}" * len(settings.scales) + "r"
    for key, _, rows in table_groups(results, settings):
        out += [
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{Base $\\to$ tuned circuit metrics, {latex_escape(block_title(key))}. "
            f"$\\Delta$ = tuned $-$ base with a {settings.level:.0%} paired bootstrap CI ({settings.n_boot} resamples); "
            f"arrows only where the CI excludes 0; p: paired sign-flip permutation test. "
            f"Entropy: {settings.bins} bins, {latex_escape(settings.range_label)}, log base {settings.log_base}.}}".replace(
                "%", "\\%"
            ),
            f"\\begin{{tabular}}{{{columns}}}",
            "\\toprule",
            " & ".join(["Dataset", "Metric"] + [f"{s} scale" for s in settings.scales] + ["$n$"]) + " \\\\",
            "\\midrule",
        ]
        for i, row in enumerate(rows):
            if i and row[0]:
                out.append("\\midrule")
            out.append(" & ".join(row) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)
