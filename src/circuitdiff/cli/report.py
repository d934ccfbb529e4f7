"""`circuitdiff report`: metrics with CIs, tables, figures and report.html for a run directory."""

from __future__ import annotations


def register(subparsers) -> None:
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
    p.add_argument("--scales", default="unit,raw",
                   help="comma list of 'unit' (each sample's W divided by its own mean |W|: scale-free) and 'raw' (the "
                        "paper's); the order of the table columns (default unit,raw)")
    p.add_argument("--bins", type=int, default=100, help="histogram bins for Information Complexity (default 100)")
    p.add_argument("--range", default="shared",
                   help="histogram range: 'shared' = [0, max|W| of base and tuned] per pair and scale (default), 'own' = "
                        "each model's own [0, max|W|], or LO:HI (raw scale)")
    p.add_argument("--log-base", choices=["e", "2", "10"], default="e", help="entropy log base (default e)")
    p.add_argument("--eps", type=float, default=1e-12, help="entropy: -sum p log(p + eps) (default 1e-12)")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--n-perm", type=int, default=10000, help="sign flips of the permutation test (default 10000)")
    p.add_argument("--ci", choices=["percentile", "bca"], default="percentile", help="bootstrap interval (default percentile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-alpha", type=float, default=0.1, help="alpha of the diversity and node-entropy figures (closest available)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from circuitdiff.errors import UserError
    from circuitdiff.report import Settings, build, parse_range

    try:
        settings = Settings(
            entries=tuple(e.strip() for e in args.entries.split(",") if e.strip()),
            scales=tuple(e.strip() for e in args.scales.split(",") if e.strip()),
            bins=args.bins,
            range=parse_range(args.range),
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
    ctx = build(args.run_dir, settings, args.out)
    for dataset, alpha, why in ctx.skipped:
        print(f"circuitdiff: skipped {dataset} alpha={alpha}: {why}", file=sys.stderr)
    print(
        f"wrote {ctx.out_dir}/report.html (+ metrics.csv, table.md, table.tex, figures) for "
        f"{len(ctx.results)} comparisons (dataset, alpha, objective, text); entries={','.join(settings.entries)}, "
        f"scales={','.join(settings.scales)}, bins={settings.bins}, "
        f"range={settings.range_label}, log base={settings.log_base}, n_boot={settings.n_boot}, seed={settings.seed}"
    )
    return 0
