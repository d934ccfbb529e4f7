"""`circuitdiff intervene`: scale chosen edges in one model of a run vs random control edges."""

from __future__ import annotations

from circuitdiff.cli import options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "intervene",
        help="scale chosen edges (targeted vs random control) and measure loss and accuracy with CIs",
        description="Scale edges u->d by FACTOR in one model of a run (d receives x_d - (1-FACTOR)*O_u) and measure "
                    "the answer loss and greedy accuracy against the unmodified model and a random-edge control.",
    )
    options.add_run_target(p, run_required=True)
    p.add_argument("--edges", default="top-grown",
                   help="top-grown (largest mean|W_tuned| - mean|W_base|), top (largest mean|W| of the role), "
                        "or a comma list 'u->d,...'")
    options.add_objective(p)
    options.add_method(p)
    p.add_argument("--k", type=int, default=10, help="number of edges for top/top-grown (default 10)")
    p.add_argument("--factor", type=float, default=0.0, help="scale factor c (0 = remove, 1 = unchanged; default 0)")
    p.add_argument("--n-random", type=int, default=5, help="random control draws of k edges (default 5)")
    p.add_argument("--control", choices=["matched", "uniform"], default="matched",
                   help="random edges matched to the targeted ones by destination layer band and mean |W| of the role "
                        "(default), or uniform over the real edges")
    p.add_argument("--bands", type=int, default=4, help="matched control: layer bands (default 4)")
    p.add_argument("--caliper", type=int, default=10,
                   help="matched control: draw each partner among the N same-band edges closest in log mean |W| (default 10)")
    p.add_argument("--n-questions", type=int, default=40, help="first N questions of the role's generations (default 40)")
    p.add_argument("--max-new-tokens", type=int, help="answer cap for accuracy (default: the run's max_new_tokens)")
    p.add_argument("--no-accuracy", action="store_true", help="measure the loss only (no generation)")
    p.add_argument("--seed", type=int, default=0)
    options.add_dtype_device(p, dtype_default=None)
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--out", help="output directory (default RUN_DIR/intervention/{scoring}/{role}/{dataset}/alpha={a}/)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from circuitdiff.config import InterventionConfig
    from circuitdiff.stages.intervene import intervene_one, label
    from circuitdiff.store import layout
    from circuitdiff.store.artifacts import read_manifest

    options.check_early(args)
    settings = options.settings_from(
        InterventionConfig, "intervene", role=args.role, edges=args.edges, objective=args.objective, method=args.method,
        ig_steps=args.ig_steps, ig_rule=args.ig_rule, k=args.k,
        factor=args.factor,
        n_random=args.n_random, control=args.control, bands=args.bands, caliper=args.caliper,
        n_questions=args.n_questions, max_new_tokens=args.max_new_tokens,
        accuracy=not args.no_accuracy, seed=args.seed, gen_batch_size=args.gen_batch_size)
    out = layout.intervention_out(args.out, label(settings)) if args.out else None
    run_max = read_manifest(Path(args.run)).get("config", {}).get("max_new_tokens")
    intervene_one(args.run, args.dataset, args.alpha, settings, dtype=args.dtype, device=args.device,
                  max_new_tokens=run_max, out=out, progress=True)
    return 0
