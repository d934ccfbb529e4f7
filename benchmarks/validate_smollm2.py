"""EAP vs exact ablation, and one edge intervention, on the real SmolLM2-135M-Instruct (CPU).

Needs the smoke run (SmolLM2 paired with itself, 40 GSM8K questions):

    circuitdiff run smoke --out /tmp/val_smoke
    nice -n 10 python benchmarks/validate_smollm2.py /tmp/val_smoke --out /tmp/val_bench

1. samples: the first --n-samples questions' own greedy answers (correct or not), cut at 10% of
   each answer's length (benchmarks/smollm2_validation_samples.py; the smoke selection holds
   only 1 both-correct question);
2. validate: every block edge (1891) exactly removed vs EAP, float32, timed; optionally a seeded
   random subset of qkv edges (--qkv-edges N); optionally a float64 finite-difference check of
   small ablations against W on N random block edges of the first sample (--fd-edges N);
3. intervene (run-dir mode, role tuned): remove (factor 0) the top-k edges by mean |W| of the
   run's attribution file vs --n-random draws of k random real edges, loss on the first
   --n-questions questions' own answers cut at the selection's T_cut; greedy accuracy too with
   --accuracy (SmolLM2 answers ~1 in 40 GSM8K questions correctly, so the loss is the measure).
Writes OUT/samples.jsonl, OUT/validation_block.{json,png} (+ _qkv), OUT/intervention.json.
With --reuse, stored validation files are re-summarised instead of recomputed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_validation_samples import build_samples  # noqa: E402

from circuitdiff import io  # noqa: E402
from circuitdiff.config import InterventionConfig  # noqa: E402
from circuitdiff.intervene import summary_line as intervention_line  # noqa: E402
from circuitdiff.models import load_model  # noqa: E402
from circuitdiff.validate import Validation, summarize, summary_line, validate  # noqa: E402


def finite_difference(sample: dict, n_edges: int, eps: float, batch_size: int, out: Path) -> None:
    """First-order check on the real model (float64): (L(x_d - eps O_u) - L(x_d + eps O_u)) / (2 eps) vs W.

    Separates "EAP is a poor proxy for removing a whole edge" (curvature) from an implementation error:
    for a small ablation the two must agree.
    """
    import numpy as np
    from scipy import stats

    from circuitdiff.attribute import attribute
    from circuitdiff.engine import ModelNodes, exact_edge_effects
    from circuitdiff.validate import choose_edges

    model = load_model("smollm2-135m-instruct", "float64", tokenizer=False).model
    graph = ModelNodes(model, "block").graph
    edges, how = choose_edges(graph, n_edges, seed=1)
    t0 = time.perf_counter()
    W = attribute(model, [sample]).scores[0][[graph.dst_index[e.dst] for e in edges], [graph.src_index[e.src] for e in edges]]
    plus, _ = exact_edge_effects(model, [sample], edges, scale=eps, batch_size=batch_size)
    minus, _ = exact_edge_effects(model, [sample], edges, scale=-eps, batch_size=batch_size)
    slope = (plus[0] - minus[0]) / (2 * eps)
    err = np.abs(slope - W)
    result = {
        "edges": how, "eps": eps, "dtype": "float64", "sample_idx": sample.get("idx"),
        "spearman": float(stats.spearmanr(slope, W).statistic), "pearson": float(stats.pearsonr(slope, W).statistic),
        "max_abs_error_over_max_abs_W": float(err.max() / np.abs(W).max()),
        "median_relative_error": float(np.median(err / np.maximum(np.abs(W), 1e-12))),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    io.write_json(out / "finite_difference.json", result)
    print(f"finite difference (float64, sample idx {result['sample_idx']}, {how}, central, eps={eps:g}): slope of the loss "
          f"in the ablated fraction vs EAP W: Spearman {result['spearman']:.6f}, Pearson {result['pearson']:.6f}, "
          f"max |slope - W| / max |W| = {result['max_abs_error_over_max_abs_W']:.2e}, median |slope - W| / |W| = "
          f"{result['median_relative_error']:.2e}; {result['seconds']:.0f} s")
    del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--qkv-edges", type=int, default=0, help="also validate N random qkv edges (0: skip)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--n-random", type=int, default=5)
    p.add_argument("--n-questions", type=int, default=40)
    p.add_argument("--accuracy", action="store_true", help="also generate greedy answers per condition (slow on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--fd-edges", type=int, default=0,
                   help="also check small ablations (float64, first sample) against W on N random block edges (0: skip)")
    p.add_argument("--fd-eps", type=float, default=1e-3)
    p.add_argument("--skip", choices=["validate", "intervene"], action="append", default=[])
    p.add_argument("--reuse", action="store_true",
                   help="reuse OUT/validation_*.json (dL and W per sample and edge) and only recompute the agreement numbers")
    args = p.parse_args()
    out = Path(args.out)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    samples = build_samples(args.run_dir, args.n_samples, 0.1)
    io.write_jsonl(out / "samples.jsonl", samples)
    print(f"samples: idx {[s['idx'] for s in samples]}, prompt lengths {[len(s['prompt_ids']) for s in samples]}, "
          f"cut_len {[s['cut_len'] for s in samples]} (10% of each own answer, correct or not)")

    if "validate" not in args.skip:
        loaded = load_model("smollm2-135m-instruct", "float32", tokenizer=False)
        runs = [("block", None)] + ([("qkv", args.qkv_edges)] if args.qkv_edges else [])
        for granularity, max_edges in runs:
            path = out / f"validation_{granularity}.json"
            if args.reuse and path.exists():  # recompute only the agreement numbers from the stored dL and W
                result = Validation.load(path)
                result.summary = summarize(result.W, result.dL, result.summary["sign_threshold"],
                                           result.summary["edges_chosen"])
                wall = result.meta["seconds_total"]
            else:
                t0 = time.perf_counter()
                result = validate(loaded, samples, granularity=granularity, max_edges=max_edges, batch_size=args.batch_size)
                wall = time.perf_counter() - t0
                result.meta.update({"samples": str(out / "samples.jsonl"), "idx": [s["idx"] for s in samples],
                                    "seconds_total": round(wall, 1)})
            result.save(path)
            print(f"validate {granularity}: {summary_line(result)}; total {wall:.0f} s "
                  f"({result.meta['seconds_exact'] / len(samples):.0f} s of exact ablation per sample)")
        del loaded

    if args.fd_edges:
        finite_difference(samples[0], args.fd_edges, args.fd_eps, args.batch_size, out)

    if "intervene" not in args.skip:
        from circuitdiff.stages.intervene import intervene_one

        t0 = time.perf_counter()
        settings = InterventionConfig(role="tuned", edges="top", k=args.k, factor=0.0, n_random=args.n_random,
                                      n_questions=args.n_questions, max_new_tokens=args.max_new_tokens,
                                      accuracy=args.accuracy)
        result, _ = intervene_one(args.run_dir, "gsm8k", 0.1, settings, out=out / "intervention.json")
        result.meta["seconds_total"] = round(time.perf_counter() - t0, 1)
        print(f"intervene: edges {', '.join(e.name for e in result.targeted)} ({result.meta['edges_chosen']})")
        print(f"intervene: {intervention_line(result)}; {result.meta['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
