"""Stage `report`: metrics, statistics, tables, figures and one HTML page for a run directory.

``build_report(run_dir)`` reads ``attribution/{base,tuned}/{dataset}/alpha={a}.npz`` (plus
``selection/`` and ``manifest.json`` when present) and writes into ``run_dir/report/``:
metrics.csv, node_entropy.csv, edge_change.csv, accuracy.csv (when generations/ exist), table.md, table.tex, fig_*.png and
report.html. Pairs with only one model, or whose files disagree, are skipped and listed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from circuitdiff import io
from circuitdiff.errors import UserError
from circuitdiff.report import tables
from circuitdiff.report.accuracy import accuracy_rows
from circuitdiff.report.compute import PairResult, Settings, analyse_pair
from circuitdiff.report.html import Figure, RawHtml, Section, Table, render_page
from circuitdiff.report.rundir import index_run, load_pair
from circuitdiff.report.sections import SECTION_BUILDERS, ReportContext

__all__ = [
    "Figure", "RawHtml", "Section", "Settings", "Table", "ReportContext", "SECTION_BUILDERS",
    "analyse_run", "build_report", "register_cli",
]  # fmt: skip


def analyse_run(run_dir: str | Path, settings: Settings = Settings()) -> tuple[list[PairResult], list[tuple[str, str, str]], object]:
    """(results, skipped, index): every comparable (dataset, alpha) pair analysed, one at a time."""
    index = index_run(run_dir)
    results, skipped = [], list(index.skipped)
    for ref in index.pairs:
        pair, problem = load_pair(ref)
        if pair is None:
            skipped.append((ref.dataset, ref.alpha, problem))
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
                "dataset": r.dataset, "alpha": r.alpha, "node": name,
                "base": c.base, "base_ci_low": c.base_ci[0], "base_ci_high": c.base_ci[1],
                "tuned": c.tuned, "tuned_ci_low": c.tuned_ci[0], "tuned_ci_high": c.tuned_ci[1],
                "diff": c.diff, "diff_ci_low": c.diff_ci[0], "diff_ci_high": c.diff_ci[1], "p_perm": c.p_perm,
                "granularity": r.granularity, "log_base": settings.log_base, "eps": settings.eps,
                "n_samples": c.n_samples, "n_boot": c.n_boot, "seed": settings.seed, "loss": r.loss_label,
            })  # fmt: skip
    return rows


def edge_change_rows(results: list[PairResult]) -> list[dict]:
    rows = []
    for r in results:
        rel = r.rel_change
        for i, dst in enumerate(r.group_dst):
            for j, src in enumerate(r.group_src):
                if r.group_mask[i, j]:
                    rows.append({
                        "dataset": r.dataset, "alpha": r.alpha, "dst": dst, "src": src,
                        "mean_abs_base": r.mean_abs_base[i, j], "mean_abs_tuned": r.mean_abs_tuned[i, j],
                        "rel_change": rel[i, j], "granularity": r.granularity,
                        "aggregation": "heads summed" if r.aggregated else "none",
                        "n_samples": r.n_samples, "loss": r.loss_label,
                    })  # fmt: skip
    return rows


def build_report(
    run_dir: str | Path,
    settings: Settings = Settings(),
    out_dir: str | Path | None = None,
    builders=None,
) -> Path:
    """Analyse the run and write the report files; returns the report directory."""
    return _build(run_dir, settings, out_dir, builders).out_dir


def _build(run_dir, settings: Settings, out_dir, builders) -> ReportContext:
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    results, skipped, index = analyse_run(run_dir, settings)
    ctx = ReportContext(run_dir, out, settings, index, results, skipped)
    sections: list[Section] = []
    for build in builders if builders is not None else SECTION_BUILDERS:
        sections += build(ctx)

    io.write_text(out / "metrics.csv", tables.to_csv(tables.csv_rows(results, settings)))
    ne = node_entropy_rows(results, settings)
    io.write_text(out / "node_entropy.csv", tables.to_csv(ne, list(ne[0])))
    ec = edge_change_rows(results)
    if ec:
        io.write_text(out / "edge_change.csv", tables.to_csv(ec, list(ec[0])))
    acc = accuracy_rows(run_dir, seed=settings.seed)
    if acc:
        io.write_text(out / "accuracy.csv", tables.to_csv(acc, list(acc[0])))
    io.write_text(out / "table.md", tables.markdown(results, settings))
    io.write_text(out / "table.tex", tables.latex(results, settings))
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                io.write_bytes(out / block.filename, block.png)
    pairs = ", ".join(f"{r.dataset} alpha={r.alpha}" for r in results)
    intro = (
        f"Run directory: {run_dir.resolve()}. Compared pairs: {pairs}. "
        "Every difference is tuned - base on the same questions."
    )
    io.write_text(out / "report.html", render_page("circuitdiff report: base vs tuned", intro, sections))
    return ctx


# ---------------------------------------------------------------------- CLI
def _parse_range(text: str) -> tuple[float, float] | None:
    if text == "shared":
        return None
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--range {text!r} is not 'shared' or LO:HI (e.g. 0:0.01)") from None
    if not hi > lo:
        raise UserError(f"--range {text!r}: HI must be larger than LO")
    return (lo, hi)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="metrics with CIs, Table-1 style tables, figures and report.html for a run directory",
        description="Compute the circuit metrics of base and tuned for every (dataset, alpha) in RUN_DIR, "
        "with paired bootstrap CIs and permutation tests, and write RUN_DIR/report/.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="output directory (default RUN_DIR/report)")
    p.add_argument("--entries", default="all,edges",
                   help="comma list of 'all' (dense n_dst x n_src, paper-compatible) and 'edges' (real edges only); "
                        "the first drives the figures (default all,edges)")  # fmt: skip
    p.add_argument("--bins", type=int, default=100, help="histogram bins for Information Complexity (default 100)")
    p.add_argument("--range", default="shared", help="histogram range: 'shared' = [0, max|W| of base and tuned] per pair (default) or LO:HI")
    p.add_argument("--log-base", choices=["e", "2", "10"], default="e", help="entropy log base (default e)")
    p.add_argument("--eps", type=float, default=1e-12, help="entropy: -sum p log(p + eps) (default 1e-12)")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--n-perm", type=int, default=10000, help="sign flips of the permutation test (default 10000)")
    p.add_argument("--ci", choices=["percentile", "bca"], default="percentile", help="bootstrap interval (default percentile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-alpha", type=float, default=0.1, help="alpha of the diversity and node-entropy figures (closest available)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    try:
        settings = Settings(
            entries=tuple(e.strip() for e in args.entries.split(",") if e.strip()),
            bins=args.bins,
            range=_parse_range(args.range),
            log_base=args.log_base,
            eps=args.eps,
            n_boot=args.n_boot,
            n_perm=args.n_perm,
            ci=args.ci,
            seed=args.seed,
            ref_alpha=args.ref_alpha,
        )
    except ValueError as err:
        raise UserError(f"{err}; see `circuitdiff report --help`") from None
    ctx = _build(args.run_dir, settings, args.out, None)
    for dataset, alpha, why in ctx.skipped:
        print(f"circuitdiff: skipped {dataset} alpha={alpha}: {why}", file=sys.stderr)
    print(
        f"wrote {ctx.out_dir}/report.html (+ metrics.csv, table.md, table.tex, figures) for "
        f"{len(ctx.results)} (dataset, alpha) pairs; entries={','.join(settings.entries)}, bins={settings.bins}, "
        f"range={settings.range_label}, log base={settings.log_base}, n_boot={settings.n_boot}, seed={settings.seed}"
    )
    return 0
