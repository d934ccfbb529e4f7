"""EAP cost against its floor: a plain forward + input-only backward of the same model.

For each sequence length, two fresh subprocesses (so peak RSS is each one's own):
  plain: the model's forward, the same answer loss, and a backward to the embedding
         output only (parameters frozen): the least any gradient method must pay;
  eap:   circuitdiff's engine on the same sample (forward + backward + all edge scores);
  eap-ig:K (with --modes): the engine's EAP-IG with K Gauss-Legendre points.
Prints seconds (best of --reps), peak RSS and RSS above the loaded model, and each mode's ratios
to plain and to eap.

    python benchmarks/bench_attribute.py --model smollm2-135m-instruct --lengths 256 512 1024 2048
    python benchmarks/bench_attribute.py --lengths 1024 --modes plain eap eap-ig:4 eap-ig:8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _measure(mode: str, model_spec: str, n_tokens: int, reps: int, granularity: str, dtype: str) -> dict:
    import torch

    from circuitdiff.engine import EdgeAttributor, answer_loss, make_batch
    from circuitdiff.models import load_model
    from circuitdiff.models.adapters import get_module

    torch.manual_seed(0)
    loaded = load_model(model_spec, dtype)
    model = loaded.model
    vocab = model.config.vocab_size
    prompt = torch.randint(10, vocab, (n_tokens // 2,)).tolist()
    answer = torch.randint(10, vocab, (n_tokens - n_tokens // 2,)).tolist()
    batch = make_batch([{"prompt_ids": prompt, "answer_ids": answer, "cut_len": len(answer)}], 0)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    method, _, steps = mode.partition(":")
    engine = EdgeAttributor(model, granularity, method="eap" if method == "plain" else method,
                            ig_steps=int(steps or 1))

    def plain() -> None:
        model.requires_grad_(False)
        box = {}
        embed = model.get_input_embeddings()

        def leaf(module, args, out):
            box["leaf"] = out.detach().requires_grad_(True)
            return box["leaf"]

        handle = embed.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                hidden = get_module(model, engine.adapter.backbone)(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).last_hidden_state
                loss = answer_loss(model, engine.adapter, hidden, batch)
                torch.autograd.grad(loss.sum(), box["leaf"])
        finally:
            handle.remove()

    run = plain if mode == "plain" else (lambda: engine.scores(batch))
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--granularity", default="block")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", nargs="+", default=["plain", "eap"], help="plain, eap, eap-ig:K (plain and eap "
                                                                               "are always measured)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, tokens = args.child
        print(json.dumps(_measure(mode, args.model, int(tokens), args.reps, args.granularity, args.dtype)))
        return

    modes = list(dict.fromkeys(["plain", "eap", *args.modes]))
    print(f"model={args.model} dtype={args.dtype} granularity={args.granularity} batch=1 "
          f"(prompt = answer = tokens/2, loss on the whole answer); best of {args.reps}")
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
            print(f"{tokens:>6} {mode:>10} {r['seconds']:>8.2f} {r['seconds'] / result['plain']['seconds']:>8.2f} "
                  f"{r['seconds'] / result['eap']['seconds']:>6.2f} {r['peak_rss_mb']:>8.0f} {above[mode]:>13.0f} "
                  f"{above[mode] / max(above['eap'], 1):>6.2f}", flush=True)
        rows.append((tokens, result["eap"]))
    if len(rows) > 1:
        (t0, e0), (t1, e1) = rows[0], rows[-1]
        growth = (e1["peak_rss_mb"] - e1["rss_after_load_mb"]) / max(e0["peak_rss_mb"] - e0["rss_after_load_mb"], 1)
        print(f"EAP memory above the loaded model grows {growth:.1f}x for {t1 / t0:.0f}x tokens "
              f"(linear would be {t1 / t0:.0f}x); torch threads = {e1['threads']}")


if __name__ == "__main__":
    main()
