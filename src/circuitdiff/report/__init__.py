"""Stage `report`: metrics, statistics, tables, figures and one HTML page for a run directory.

``build_report(run_dir)`` reads every W file of the run (store.layout.find_attributions; plus
``selection/`` and ``manifest.json`` when present) and writes into ``run_dir/report/``:
metrics.csv, node_entropy.csv, edge_change.csv, accuracy.csv (when generations/ exist), table.md, table.tex, fig_*.png and
report.html. Pairs with only one model, or whose files disagree, are skipped and listed.
"""

from __future__ import annotations

from pathlib import Path

from circuitdiff import io
from circuitdiff.errors import UserError
from circuitdiff.report import tables
from circuitdiff.report.accuracy import accuracy_rows
from circuitdiff.report.compute import PairResult, Settings, analyse_pair
from circuitdiff.report.html import Figure, RawHtml, Section, Table, render_page
from circuitdiff.report.pairs import index_run, load_pair
from circuitdiff.report.sections import SECTION_BUILDERS, ReportContext
from circuitdiff.store import layout

__all__ = [
    "Figure", "RawHtml", "Section", "Settings", "Table", "ReportContext", "SECTION_BUILDERS",
    "analyse_run", "build", "build_report", "parse_range",
]  # fmt: skip


def analyse_run(run_dir: str | Path, settings: Settings = Settings()) -> tuple[list[PairResult], list[tuple[str, str, str]], object]:
    """(results, skipped, index): every comparison (dataset, alpha, objective, text) analysed, one at a time."""
    index = index_run(run_dir)
    results, skipped = [], list(index.skipped)
    for ref in index.pairs:
        pair, problem = load_pair(ref)
        if pair is None:
            skipped.append((ref.dataset, ref.alpha, f"{problem} (objective {ref.objective}, text {ref.text})"))
            continue
        results.append(analyse_pair(pair, settings))
        del pair
    if not results:
        reasons = "; ".join(f"{d} alpha={a}: {why}" for d, a, why in skipped)
        raise UserError(f"{run_dir}: no (dataset, alpha) has comparable base and tuned attribution files ({reasons})")
    return results, skipped, index


def node_entropy_rows(results: list[PairResult], settings: Settings) -> list[dict]:
    rows = []
    for r in results:
        for name, c in zip(r.node_entropy.src_names, r.node_entropy.comparisons):
            rows.append({
                **r.columns, "node": name,
                "base": c.base, "base_ci_low": c.base_ci[0], "base_ci_high": c.base_ci[1],
                "tuned": c.tuned, "tuned_ci_low": c.tuned_ci[0], "tuned_ci_high": c.tuned_ci[1],
                "diff": c.diff, "diff_ci_low": c.diff_ci[0], "diff_ci_high": c.diff_ci[1], "p_perm": c.p_perm,
                "granularity": r.granularity, "log_base": settings.log_base, "eps": settings.eps,
                "n_samples": c.n_samples, "n_boot": c.n_boot, "seed": settings.seed,
            })  # fmt: skip
    return rows


def edge_change_rows(results: list[PairResult], settings: Settings) -> list[dict]:
    rows = []
    for r in results:
        for scale in settings.scales:
            rel, Ab, At = r.rel_change(scale), r.mean_abs_base[scale], r.mean_abs_tuned[scale]
            for i, dst in enumerate(r.group_dst):
                for j, src in enumerate(r.group_src):
                    if r.group_mask[i, j]:
                        rows.append({
                            **r.columns, "scale": scale, "dst": dst, "src": src,
                            "mean_abs_base": Ab[i, j], "mean_abs_tuned": At[i, j],
                            "rel_change": rel[i, j], "granularity": r.granularity,
                            "aggregation": "heads summed" if r.aggregated else "none",
                            "entries_for_unit": settings.entries[0] if scale == "unit" else "",
                            "n_samples": r.n_samples,
                        })  # fmt: skip
    return rows


def build_report(
    run_dir: str | Path,
    settings: Settings = Settings(),
    out_dir: str | Path | None = None,
    builders=None,
) -> Path:
    """Analyse the run and write the report files; returns the report directory."""
    return build(run_dir, settings, out_dir, builders).out_dir


def build(run_dir, settings: Settings = Settings(), out_dir=None, builders=None) -> ReportContext:
    """Analyse the run, write the report files, and return the context (results, skipped pairs)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else layout.report_dir(run_dir)
    results, skipped, index = analyse_run(run_dir, settings)
    ctx = ReportContext(run_dir, out, settings, index, results, skipped)
    sections: list[Section] = []
    for builder in builders if builders is not None else SECTION_BUILDERS:
        sections += builder(ctx)

    io.write_text(layout.report_file(out, "metrics"), tables.to_csv(tables.csv_rows(results, settings)))
    ne = node_entropy_rows(results, settings)
    io.write_text(layout.report_file(out, "node_entropy"), tables.to_csv(ne, list(ne[0])))
    ec = edge_change_rows(results, settings)
    if ec:
        io.write_text(layout.report_file(out, "edge_change"), tables.to_csv(ec, list(ec[0])))
    acc = accuracy_rows(run_dir, seed=settings.seed)
    if acc:
        io.write_text(layout.report_file(out, "accuracy"), tables.to_csv(acc, list(acc[0])))
    io.write_text(layout.report_file(out, "table_md"), tables.markdown(results, settings))
    io.write_text(layout.report_file(out, "table_tex"), tables.latex(results, settings))
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                io.write_bytes(layout.report_figure(out, block.filename), block.png)
    pairs = ", ".join(dict.fromkeys(f"{r.dataset} alpha={r.alpha}" for r in results))
    controls = ", ".join(dict.fromkeys(f"{r.objective}/{r.text}" for r in results))
    intro = (
        f"Run directory: {run_dir.resolve()}. Compared (dataset, alpha): {pairs}; objective/text: {controls}. "
        "Every difference is tuned - base on the same questions."
    )
    io.write_text(layout.report_file(out, "html"), render_page("circuitdiff report: base vs tuned", intro, sections))
    return ctx


def parse_range(text: str) -> str | tuple[float, float]:
    """The histogram range option: 'shared', 'own' or LO:HI."""
    if text in ("shared", "own"):
        return text
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--range {text!r} is not 'shared', 'own' or LO:HI (e.g. 0:0.01)") from None
    if not hi > lo:
        raise UserError(f"--range {text!r}: HI must be larger than LO")
    return (lo, hi)
