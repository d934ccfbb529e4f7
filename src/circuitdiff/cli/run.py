"""`circuitdiff run`: the pipeline for a model pair into a run directory."""

from __future__ import annotations

from circuitdiff.choices import METHODS
from circuitdiff.cli import options
from circuitdiff.pipeline import STAGES


def register(subparsers) -> None:
    from circuitdiff.config import preset_names

    p = subparsers.add_parser(
        "run",
        help="generate -> grade -> select -> attribute [-> validation -> intervention] for a model pair",
        description="Run the whole pipeline for the model pair of CONFIG (a YAML file or a preset name). "
                    "A rerun resumes: finished work is skipped, and work whose settings changed is redone.",
    )
    p.add_argument("config", help=f"YAML config, or a preset: {', '.join(preset_names())}")
    p.add_argument("--out", help="run directory (default: the config's `out`, else runs/<name>)")
    p.add_argument("--method", nargs="+", choices=list(METHODS),
                   help="override the config's attribution method(s): eap, eap-ig, or both (eap eap-ig)")
    p.add_argument("--ig-steps", type=int, help="override the config's ig_steps (eap-ig quadrature points)")
    p.add_argument("--until", choices=STAGES, default=STAGES[-1], help="stop after this stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    options.add_parallel(p, workers_default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from circuitdiff.config import load_config
    from circuitdiff.pipeline import run as run_pipeline

    config = load_config(args.config)
    overrides = {k: v for k, v in (("method", args.method), ("ig_steps", args.ig_steps)) if v is not None}
    if any(v is not None for v in (args.workers, args.ray_address, args.cpus_per_worker, args.gpus_per_worker)):
        overrides["parallel"] = options.parallel_from(args, config.parallel).model_dump()
    out = run_pipeline(config, args.out, until=args.until, progress=not args.no_progress, **overrides)
    print(f"run directory: {out}")
    return 0
