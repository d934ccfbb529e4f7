"""`circuitdiff validate`: EAP scores vs exact edge ablation on the same samples."""

from __future__ import annotations

from circuitdiff.cli import options

DEFAULT_SIGN_THRESHOLD = 1e-5


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "validate",
        help="EAP (or EAP-IG) scores vs exact edge ablation on the same samples (correlations, sign agreement, scatter)",
        description="Remove each chosen edge exactly (zero ablation: d receives x_d - O_u, nothing else changes), "
                    "measure the loss change dL, and compare it with the EAP score W of the same edge. Either "
                    "--model and --samples, or --run with --role/--dataset/--alpha.",
    )
    p.add_argument("--model", help=options.MODEL_HELP)
    p.add_argument("--samples", help=options.SAMPLES_HELP)
    options.add_run_target(p)
    p.add_argument("--n-samples", type=int, default=4, help="with --run: the first N selected samples (default 4)")
    options.add_granularity(p)
    options.add_objective(p)
    options.add_method(p)
    p.add_argument("--max-edges", type=int, default=-1,
                   help="validate a seeded random subset of N edges (default: all edges at block, 300 at qkv/head)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random edge subset (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward: 1 clean + B-1 edges (default 32)")
    options.add_dtype_device(p, dtype_default=None)
    p.add_argument("--sign-threshold", type=float, default=DEFAULT_SIGN_THRESHOLD,
                   help=f"sign agreement counts edges with |dL| above this, in the objective's units (nats for nll; "
                        f"default {DEFAULT_SIGN_THRESHOLD:g})")
    p.add_argument("--out", help="output directory (validation.json + validation.png); with --run default "
                                 "RUN_DIR/validation/{scoring}/{role}/{dataset}/alpha={a}.json (scoring: "
                                 "the objective, + the method when not eap: nll+eap-ig8)")
    p.set_defaults(func=run)


def run(args) -> int:
    from circuitdiff.errors import UserError
    from circuitdiff.store import layout

    options.check_early(args)

    if args.run:
        from circuitdiff.config import ValidationConfig
        from circuitdiff.stages.validate import validate_one

        if args.dataset is None or args.alpha is None:
            raise UserError("--run needs --dataset and --alpha (and --role, default tuned)")
        if args.model or args.samples:
            raise UserError("give either --run or --model/--samples, not both")
        settings = options.settings_from(
            ValidationConfig, "validate", roles=[args.role], n_samples=args.n_samples, granularity=args.granularity,
            objective=args.objective, method=args.method, ig_steps=args.ig_steps, ig_rule=args.ig_rule,
            max_edges=args.max_edges, seed=args.seed, sign_threshold=args.sign_threshold, batch_size=args.batch_size)
        out = layout.validation_out(args.out)[0] if args.out else None
        validate_one(args.run, args.role, args.dataset, args.alpha, settings, dtype=args.dtype, device=args.device,
                     out=out, progress=True)
        return 0
    from circuitdiff.validate import summary_line, validate

    if not args.model or not args.samples or not args.out:
        raise UserError("give --model, --samples and --out (or --run RUN_DIR --dataset D --alpha A)")
    result = validate(args.model, args.samples, granularity=args.granularity, max_edges=args.max_edges, seed=args.seed,
                      batch_size=args.batch_size, dtype=args.dtype or "float32", device=args.device,
                      sign_threshold=args.sign_threshold, objective=args.objective, method=args.method,
                      ig_steps=args.ig_steps, ig_rule=args.ig_rule, progress=True)
    result.meta.update({"samples": args.samples})
    json_path, png_path = layout.validation_out(args.out)
    result.save(json_path, png_path)
    print(f"wrote {json_path} and {png_path}: {summary_line(result)}")
    return 0
