"""EAP and EAP-IG against exact edge ablation: agreement, time and memory, for K = 1, 2, 4, 8, 16.

    python benchmarks/ig_agreement.py --model M --samples S.jsonl --out DIR [--steps 1 2 4 8 16] [--rule gauss]
    python benchmarks/ig_agreement.py --run RUN --role tuned --dataset arith --alpha 0.1 --n 2 --out DIR

The exact loss change of removing each block edge (zero ablation) is computed once and kept in
DIR/exact.npz (a rerun reuses it). Each method then runs in a fresh process: attribute() on the
same samples, best of --reps; the table gives Spearman, Pearson, sign agreement (|dL| > 1e-5) and
top-5% overlap of the sample-mean W against the sample-mean dL over all edges
(circuitdiff.validate.agreement), and the time as a multiple of the EAP run's. Memory needs longer
sequences than these samples to rise above the loaded model: benchmarks/bench_attribute.py
--modes plain eap eap-ig:8 measures it. Writes DIR/agreement.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _samples(args) -> list[dict]:
    from circuitdiff.samples import read_samples
    from circuitdiff.store import artifacts

    if args.run:
        samples, _ = artifacts.selected_samples(args.run, args.role, args.dataset, args.alpha, args.n)
        return samples
    return read_samples(args.samples)[: args.n]


def _model_spec(args) -> str:
    if args.run:
        from circuitdiff.store import artifacts

        return artifacts.run_model(args.run, args.role)[0]
    return args.model


def child(args) -> None:
    """One method in this process: W and seconds (best of reps)."""
    from circuitdiff.attribute import attribute
    from circuitdiff.models import load_model

    samples = _samples(args)
    model = load_model(_model_spec(args), "float32", tokenizer=False).model
    method, steps = args.child
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        result = attribute(model, samples, method=method, ig_steps=int(steps), ig_rule=args.rule)
        times.append(time.perf_counter() - start)
    np.save(Path(args.out) / f"W_{method}_{steps}.npy", result.scores)
    print(json.dumps({"seconds": min(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--samples")
    p.add_argument("--run")
    p.add_argument("--role", default="tuned")
    p.add_argument("--dataset")
    p.add_argument("--alpha", type=float)
    p.add_argument("--n", type=int, default=None, help="the first n samples")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--rule", default="midpoint")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return

    from circuitdiff.engine import exact_edge_effects
    from circuitdiff.graph import all_edges, edge_index
    from circuitdiff.models import load_model
    from circuitdiff.validate import agreement

    samples = _samples(args)
    model = load_model(_model_spec(args), "float32", tokenizer=False).model
    from circuitdiff.engine import ModelNodes

    graph = ModelNodes(model, "block").graph
    edges = all_edges(graph)
    rows, cols = edge_index(edges, graph)
    exact_path = out / "exact.npz"
    if exact_path.exists():
        dL = np.load(exact_path)["dL"]
    else:
        start = time.perf_counter()
        dL, _ = exact_edge_effects(model, samples, edges, batch_size=32, progress=True)
        np.savez(exact_path, dL=dL, seconds=time.perf_counter() - start)
    del model

    forwarded = ["--model", args.model] if args.model else ["--run", args.run, "--role", args.role, "--dataset",
                                                            args.dataset, "--alpha", str(args.alpha)]
    forwarded += (["--samples", args.samples] if args.samples else []) + (["--n", str(args.n)] if args.n else [])
    methods = [("eap", 0)] + [("eap-ig", k) for k in args.steps]
    results = []
    for method, steps in methods:
        cmd = [sys.executable, __file__, *forwarded, "--out", str(out), "--rule", args.rule, "--reps", str(args.reps),
               "--child", method, str(steps)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{method} K={steps} failed:\n{done.stderr[-3000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        W = np.load(out / f"W_{method}_{steps}.npy")[:, rows, cols].astype(np.float64)
        summary = agreement(W.mean(0), dL.mean(0))
        results.append({"method": method if method == "eap" else f"eap-ig K={steps} ({args.rule})", **measured,
                        **{k: summary[k] for k in ("spearman", "pearson", "sign_agreement", "top5pct_overlap")}})
    eap = results[0]
    for r in results:
        r["time_x_eap"] = r["seconds"] / eap["seconds"]
    (out / "agreement.json").write_text(json.dumps({"n_samples": len(samples), "n_edges": len(edges),
                                                    "exact_seconds": float(np.load(exact_path)["seconds"]),
                                                    "results": results}, indent=2))
    lengths = [len(s["prompt_ids"]) + s["cut_len"] for s in samples]
    print(f"{len(samples)} samples ({lengths} tokens), all {len(edges)} block edges, exact ablation "
          f"{float(np.load(exact_path)['seconds']):.0f} s; agreement of the sample means over edges")
    print("| method | Spearman | Pearson | sign agreement | top-5% overlap | time (x EAP) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['spearman']:.3f} | {r['pearson']:.3f} | {r['sign_agreement']:.3f} | "
              f"{r['top5pct_overlap']:.2f} | {r['seconds']:.2f} s ({r['time_x_eap']:.1f}x) |")


if __name__ == "__main__":
    main()
