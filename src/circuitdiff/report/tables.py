"""metrics.csv, table.md and table.tex from the pair results.

metrics.csv has one row per (dataset, alpha, entries, metric, role), role in base /
tuned / diff (tuned - base), with the 95% CI and every convention that produced the
number. Tests and effect sizes fill the diff rows. p_perm_holm is Holm-adjusted over
every diff row of the report (all datasets, alphas, entries modes and metrics).

The tables follow the paper's Table 1: rows dataset x metric, "base -> tuned" with an
arrow only where the 95% CI of the difference excludes 0.
"""

from __future__ import annotations

import csv
import io as _io
import math

from circuitdiff import metrics as M
from circuitdiff import stats as S
from circuitdiff.report.compute import PairResult, Settings

CSV_COLUMNS = [
    "dataset", "alpha", "metric", "role", "value", "ci_low", "ci_high",
    "p_perm", "p_perm_holm", "perm_exact", "p_wilcoxon", "cohen_dz", "rel_diff", "arrow",
    "granularity", "entries", "bins", "range", "log_base", "eps", "loss",
    "n_samples", "n_boot", "n_perm", "seed", "ci_method",
]  # fmt: skip

ARROWS = {"up": ("↑", r"$\uparrow$"), "down": ("↓", r"$\downarrow$"), "": ("", "")}


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


def _range_text(r: tuple[float, float], settings: Settings) -> str:
    return f"[{r[0]:.6g}, {r[1]:.6g}] {'shared' if settings.range is None else 'fixed'}"


def diff_rows_in_order(results: list[PairResult], settings: Settings) -> list[tuple[PairResult, str, str, S.Comparison]]:
    return [
        (res, entries, metric, res.comparisons[(entries, metric)])
        for res in results
        for entries in settings.entries
        for metric in M.METRICS
    ]


def holm_adjusted(results: list[PairResult], settings: Settings) -> dict[tuple[str, str, str, str], float]:
    items = diff_rows_in_order(results, settings)
    adjusted = S.holm([c.p_perm for *_, c in items])
    return {(r.dataset, r.alpha, e, m): p for (r, e, m, _), p in zip(items, adjusted)}


def csv_rows(results: list[PairResult], settings: Settings) -> list[dict]:
    holm = holm_adjusted(results, settings)
    rows = []
    for res, entries, metric, c in diff_rows_in_order(results, settings):
        common = {
            "dataset": res.dataset, "alpha": res.alpha, "metric": metric,
            "granularity": res.granularity, "entries": entries, "bins": settings.bins,
            "range": _range_text(res.ranges[entries], settings), "log_base": settings.log_base,
            "eps": settings.eps, "loss": res.loss_label, "n_samples": c.n_samples,
            "n_boot": c.n_boot, "n_perm": "all 2^n flips" if c.perm_exact else c.n_perm,
            "seed": settings.seed, "ci_method": settings.ci_method,
        }  # fmt: skip
        for role, value, ci in (("base", c.base, c.base_ci), ("tuned", c.tuned, c.tuned_ci), ("diff", c.diff, c.diff_ci)):
            row = dict(common, role=role, value=value, ci_low=ci[0], ci_high=ci[1])
            if role == "diff":
                row.update(
                    p_perm=c.p_perm, p_perm_holm=holm[(res.dataset, res.alpha, entries, metric)],
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


# ------------------------------------------------------------ Table 1 layout
TABLE_HEADER = ["Dataset", "Metric", "Base → Tuned", "Δ [95% CI]", "Δ %", "p (perm.)", "n"]


def table_groups(results: list[PairResult], settings: Settings) -> list[tuple[str, float, str, list[list[str]], list[list[str]]]]:
    """[(entries, alpha_value, alpha_label, rows_text, rows_tex)]: one Table-1 block per entries mode and alpha."""
    groups = []
    alphas = sorted({(r.alpha_value, r.alpha) for r in results})
    for entries in settings.entries:
        for alpha_value, alpha in alphas:
            text_rows, tex_rows = [], []
            for res in [r for r in results if r.alpha == alpha]:
                for i, metric in enumerate(M.METRICS):
                    c = res.comparisons[(entries, metric)]
                    arrow_txt, arrow_tex = ARROWS[c.arrow]
                    dataset = res.dataset if i == 0 else ""
                    ci = f"{fmt(c.diff)} [{fmt(c.diff_ci[0])}, {fmt(c.diff_ci[1])}]"
                    rel = f"{100 * c.rel_diff:+.1f}%" if math.isfinite(c.rel_diff) else "n/a"
                    text_rows.append([dataset, M.METRIC_LABELS[metric], f"{fmt(c.base)} → {fmt(c.tuned)} {arrow_txt}".rstrip(),
                                      ci, rel, fmt_p(c.p_perm), str(c.n_samples)])
                    tex_rows.append([latex_escape(dataset), M.METRIC_LABELS[metric],
                                     f"{fmt(c.base)} $\\to$ {fmt(c.tuned)} {arrow_tex}".rstrip(),
                                     f"{fmt(c.diff)} [{fmt(c.diff_ci[0])}, {fmt(c.diff_ci[1])}]",
                                     latex_escape(rel), latex_escape(fmt_p(c.p_perm)), str(c.n_samples)])
            if text_rows:
                groups.append((entries, alpha_value, alpha, text_rows, tex_rows))
    return groups


def conventions_line(results: list[PairResult], settings: Settings) -> str:
    grans = sorted({r.granularity for r in results})
    losses = sorted({r.loss_label for r in results})
    return (
        f"granularity={'/'.join(grans)}; histogram: bins={settings.bins}, range={settings.range_label}, "
        f"log base={settings.log_base}, eps={settings.eps:g}; kurtosis: excess (Fisher), of signed W, biased moments; "
        f"CI: {settings.ci_method}, n_boot={settings.n_boot}; p: two-sided paired sign-flip permutation test "
        f"(n_perm={settings.n_perm}, or all 2^n flips when fewer); seed={settings.seed}; loss: {'; '.join(losses)}; "
        "arrows only where the CI of tuned - base excludes 0."
    )


def markdown(results: list[PairResult], settings: Settings) -> str:
    out = ["# Base vs tuned circuit metrics (layout of the paper's Table 1)", "", conventions_line(results, settings), ""]
    for entries, _, alpha, rows, _ in table_groups(results, settings):
        out += [f"## entries = {entries}, alpha = {alpha}", ""]
        out.append("| " + " | ".join(TABLE_HEADER) + " |")
        out.append("|" + "|".join("---" for _ in TABLE_HEADER) + "|")
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
    for entries, _, alpha, _, rows in table_groups(results, settings):
        out += [
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{Base $\\to$ tuned circuit metrics, entries={entries}, $\\alpha$={alpha}. "
            f"$\\Delta$ = tuned $-$ base with a {settings.level:.0%} paired bootstrap CI ({settings.n_boot} resamples); "
            f"arrows only where the CI excludes 0; p: paired sign-flip permutation test. "
            f"Entropy: {settings.bins} bins, {latex_escape(settings.range_label)}, log base {settings.log_base}.}}".replace(
                "%", "\\%"
            ),
            "\\begin{tabular}{llllrrr}",
            "\\toprule",
            " & ".join(["Dataset", "Metric", "Base $\\to$ Tuned", "$\\Delta$ [95\\% CI]", "$\\Delta$ \\%", "$p$", "$n$"]) + " \\\\",
            "\\midrule",
        ]
        for i, row in enumerate(rows):
            if i and row[0]:
                out.append("\\midrule")
            out.append(" & ".join(row) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)
