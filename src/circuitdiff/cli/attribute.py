"""`circuitdiff attribute`: per-sample edge scores W for a samples file."""

from __future__ import annotations

from circuitdiff.cli import options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attribute",
        help="per-sample edge scores W (EAP: one forward + one backward per batch)",
        description="Score every edge of the residual graph for each sample with EAP (or EAP-IG) and write W.npz.",
    )
    options.add_model(p)
    p.add_argument("--samples", required=True, help=options.SAMPLES_HELP)
    options.add_granularity(p)
    options.add_objective(p)
    options.add_method(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward (less memory)")
    p.add_argument("--out", required=True, help="output W.npz")
    options.add_parallel(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import shutil
    from pathlib import Path

    import numpy as np

    from circuitdiff.attribute import attribute, loss_convention

    parallel = options.parallel_from(args)
    if parallel is None or not parallel.address:
        options.check_early(args, out="file")
    else:  # the device is the workers' (they check it), the output is here
        options.writable_file(args.out)
    out = Path(args.out)
    work = out.with_name(out.name + ".parts")
    common = dict(granularity=args.granularity, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                  gradient_checkpointing=args.gradient_checkpointing, objective=args.objective, method=args.method,
                  ig_steps=args.ig_steps, ig_rule=args.ig_rule, work_dir=work)
    if parallel.workers > 1:
        from circuitdiff.parallel.attribution import attribute_sharded
        from circuitdiff.parallel.pool import Pool

        with Pool.of(parallel, args.device) as pool:
            result = attribute_sharded(pool, args.model, args.samples, **common)
    else:
        result = attribute(args.model, args.samples, progress=True, **common)
    result.save(out)
    shutil.rmtree(work, ignore_errors=True)
    n, n_dst, n_src = result.scores.shape
    mean_abs = float(np.abs(result.scores).mean())
    print(
        f"wrote {out}: {n} samples x {n_dst} destinations x {n_src} sources "
        f"(method {result.meta['method']}, granularity={result.granularity}, {int(result.edge_mask.sum())} edges); "
        f"mean |W| over all {n_dst}x{n_src} entries = {mean_abs:.4g}; mean objective = {float(result.loss.mean()):.4f} "
        f"(objective {args.objective}: {loss_convention(args.objective)})"
    )
    return 0
