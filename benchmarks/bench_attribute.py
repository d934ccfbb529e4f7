"""EAP cost against its floor: a plain forward + input-only backward of the same model.

For each sequence length, one fresh subprocess per mode (so peak RSS is each one's own):
  plain: the model's forward, the same answer loss, and a backward to the embedding
         output only (parameters frozen): the least any gradient method must pay (baselines.py);
  eap:   circuitdiff's engine on the same sample (forward + backward + all edge scores);
  eap-ig:K (with --modes): the engine's EAP-IG with K points;
  MODE+gc: the same with activation checkpointing per decoder layer (--gradient-checkpointing both|on).
Prints seconds (best of --reps), peak RSS and RSS above the loaded model, each mode's ratios to
plain (with the same checkpointing) and to eap, and how memory above the loaded model grows.

    python benchmarks/bench_attribute.py --model smollm2-135m-instruct --lengths 256 512 1024 2048 4096 8192
    python benchmarks/bench_attribute.py --lengths 4096 8192 --reps 1 --gradient-checkpointing both
    python benchmarks/bench_attribute.py --lengths 1024 --modes plain eap eap-ig:4 eap-ig:8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _measure(mode: str, model_spec: str, n_tokens: int, reps: int, granularity: str, dtype: str) -> dict:
    import torch

    from baselines import plain_backward, random_sample
    from circuitdiff.engine import EdgeAttributor, make_batch
    from circuitdiff.models import load_model

    torch.manual_seed(0)
    model = load_model(model_spec, dtype).model
    batch = make_batch([random_sample(model.config.vocab_size, n_tokens)], 0)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base, _, gc = mode.partition("+")
    method, _, steps = base.partition(":")
    checkpointing = gc == "gc"
    engine = EdgeAttributor(model, granularity, checkpointing, method="eap" if method == "plain" else method,
                            ig_steps=int(steps or 1))
    run = (lambda: plain_backward(model, batch, checkpointing)) if method == "plain" else (lambda: engine.scores(batch))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "tokens": n_tokens,
        "seconds": min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--granularity", default="block")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", nargs="+", default=["plain", "eap"], help="plain, eap, eap-ig:K (plain and eap "
                                                                               "are always measured)")
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off",
                        help="off: modes as given; on: every mode with +gc; both: each mode without and with")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, tokens = args.child
        print(json.dumps(_measure(mode, args.model, int(tokens), args.reps, args.granularity, args.dtype)))
        return

    base_modes = list(dict.fromkeys(["plain", "eap", *args.modes]))
    suffixes = {"off": [""], "on": ["+gc"], "both": ["", "+gc"]}[args.gradient_checkpointing]
    modes = [m + s for s in suffixes for m in base_modes]
    print(f"model={args.model} dtype={args.dtype} granularity={args.granularity} batch=1 "
          f"(prompt = answer = tokens/2, loss on the whole answer); best of {args.reps}; +gc: activation checkpointing "
          "per decoder layer; x plain: against plain with the same checkpointing")
    print(f"{'tokens':>6} {'mode':>10} {'seconds':>8} {'x plain':>8} {'x eap':>6} {'peak MB':>8} {'above load MB':>13} "
          f"{'x eap':>6}")
    rows = []
    for tokens in args.lengths:
        result = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--model", args.model, "--reps", str(args.reps), "--granularity",
                   args.granularity, "--dtype", args.dtype, "--child", mode, str(tokens)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            result[mode] = json.loads(out)
        above = {m: r["peak_rss_mb"] - r["rss_after_load_mb"] for m, r in result.items()}
        for mode, r in result.items():
            gc = "+gc" if mode.endswith("+gc") else ""
            plain, eap = result["plain" + gc], result["eap" + gc]
            print(f"{tokens:>6} {mode:>10} {r['seconds']:>8.2f} {r['seconds'] / plain['seconds']:>8.2f} "
                  f"{r['seconds'] / eap['seconds']:>6.2f} {r['peak_rss_mb']:>8.0f} {above[mode]:>13.0f} "
                  f"{above[mode] / max(above['eap' + gc], 1):>6.2f}", flush=True)
        rows.append((tokens, result))
    if len(rows) > 1:
        (t0, r0), (t1, r1) = rows[0], rows[-1]
        for mode in modes:
            grow = (r1[mode]["peak_rss_mb"] - r1[mode]["rss_after_load_mb"]) / max(
                r0[mode]["peak_rss_mb"] - r0[mode]["rss_after_load_mb"], 1)
            print(f"{mode}: memory above the loaded model grows {grow:.1f}x for {t1 / t0:.0f}x tokens "
                  f"(linear would be {t1 / t0:.0f}x)")
        print(f"torch threads = {r1['eap' + suffixes[0]]['threads']}")
    if args.json:
        Path(args.json).write_text(json.dumps([r for _, result in rows for r in result.values()], indent=2))


if __name__ == "__main__":
    main()
