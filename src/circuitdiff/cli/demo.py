"""`circuitdiff demo`: the offline demo on the shipped pair."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline demo: SmolLM2-135M-Instruct vs its GRPO-tuned LoRA, generate -> ... -> report.html",
        description="Run the whole pipeline offline on the shipped pair (base SmolLM2-135M-Instruct, tuned = "
                    "the packaged GRPO LoRA adapter) on the held-out arith problems, then validate, intervene, report.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); a rerun resumes")
    p.add_argument("--tuned", help="another tuned model spec instead of the packaged adapter")
    p.add_argument("--limit", type=int, help="first n test problems only (quicker)")
    p.add_argument("--validate-samples", type=int, default=1,
                   help="samples per model for exact-ablation validation (default 1; 0: skip)")
    p.add_argument("--intervene-questions", type=int, default=32, help="questions for the intervention (default 32; 0: skip)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from circuitdiff.demo import demo

    demo(args.out, tuned=args.tuned, limit=args.limit, validate_samples=args.validate_samples,
         intervene_questions=args.intervene_questions, progress=not args.no_progress)
    return 0
