"""Two Ray workers against one process, on SmolLM2-135M-Instruct: the same answers and W, and the time each takes.

Generation: the first --questions arith test questions, greedy, --max-new-tokens, batches of
--gen-batch; attribution: each question's own answer (cut at --cut tokens), batches of
--attr-batch. One process runs with --threads torch threads; the pool's workers hold 1 CPU (one
thread) each on a local cluster started here. Identity is checked against one process at the
workers' thread count (1) and, for W, also at --threads (float32 sums then run in another order).

    python benchmarks/bench_parallel.py --questions 48 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--attr-batch", type=int, default=2)
    parser.add_argument("--cut", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    from circuitdiff.attribute import attribute
    from circuitdiff.data import load_problems
    from circuitdiff.decoding import HFBackend
    from circuitdiff.models import load_model
    from circuitdiff.parallel.attribution import attribute_sharded
    from circuitdiff.parallel.plan import batches_by_length, n_shards_for, padded_cost, plan_shards
    from circuitdiff.parallel.pool import Load, Pool
    from circuitdiff.parallel.shards import run_sharded
    from circuitdiff.prompts import encode
    from circuitdiff.stages.generate import answer_batches, answerer

    spec, scratch = "smollm2-135m-instruct", Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    loaded = load_model(spec)
    problems = load_problems("arith", "test", None, args.questions)
    prompts = [encode(p.question, loaded.tokenizer, "chat") for p in problems]
    batches = batches_by_length([len(p) for p in prompts], args.gen_batch, tie=[p.idx for p in problems])

    def one_process_generation(threads: int) -> tuple[dict, float]:
        torch.set_num_threads(threads)
        backend, out = HFBackend(loaded.model, loaded.tokenizer, args.max_new_tokens), {}
        start = time.perf_counter()
        for batch in batches:
            for i, gen in zip(batch, backend.generate([prompts[i] for i in batch])):
                out[problems[i].idx] = gen.answer_ids
        return out, time.perf_counter() - start

    gen_one, t_gen_one = one_process_generation(args.threads)
    gen_one1, _ = one_process_generation(1)
    samples = [{"prompt_ids": prompts[i], "answer_ids": gen_one[p.idx], "cut_len": min(args.cut, len(gen_one[p.idx]))}
               for i, p in enumerate(problems) if gen_one[p.idx]]

    def one_process_attribution(threads: int):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        return attribute(loaded, samples, batch_size=args.attr_batch), time.perf_counter() - start

    W_one, t_attr_one = one_process_attribution(args.threads)
    W_one1, _ = one_process_attribution(1)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    with Pool(args.workers, log=lambda *_: None) as pool:
        t_pool = time.perf_counter() - start
        load = Load.of(answerer, spec=spec, trust_remote_code=False, dtype="float32", device="cpu",
                       attn_implementation="sdpa", backend="hf", max_new_tokens=args.max_new_tokens)
        lengths = [len(p) for p in prompts]
        shards = plan_shards(batches, [padded_cost(b, lengths, args.max_new_tokens) for b in batches],
                             n_shards_for(len(batches), args.workers))
        start = time.perf_counter()
        rows = run_sharded(pool, shards, folder=scratch / "gen", job_key="bench", suffix=".jsonl", load=load,
                           fn=answer_batches, save=lambda *_: None, read=lambda _: None, name="generate",
                           log=lambda *_: None,
                           payload=lambda s: {"batches": [[(problems[i], prompts[i]) for i in b] for b in s.batches],
                                              "rule": "strict"})
        t_gen_par = time.perf_counter() - start
        gen_par = {row["idx"]: row["answer_ids"] for shard in rows for row in shard}
        start = time.perf_counter()
        W_par = attribute_sharded(pool, spec, samples, batch_size=args.attr_batch, work_dir=scratch / "attr",
                                  log=lambda *_: None)
        t_attr_par = time.perf_counter() - start

    def rel(a, b) -> float:
        scale = np.abs(b.scores).reshape(len(b.scores), -1).max(axis=1)
        return float((np.abs(a.scores - b.scores).reshape(len(b.scores), -1).max(axis=1) / scale).max())

    n_tokens = sum(len(a) for a in gen_one.values())
    print(f"SmolLM2-135M-Instruct, float32, CPU ({torch.get_num_threads()} threads in one process; {args.workers} Ray "
          f"workers x 1 CPU); {len(problems)} arith questions, greedy, <= {args.max_new_tokens} new tokens, batches of "
          f"{args.gen_batch}; attribution of {len(samples)} own answers cut at {args.cut} tokens, batches of "
          f"{args.attr_batch}, block graph, nll")
    print(f"{'':<34} {'1 process':>10} {f'{args.workers} workers':>10} {'ratio':>6}")
    print(f"{'generation s':<34} {t_gen_one:>10.1f} {t_gen_par:>10.1f} {t_gen_one / t_gen_par:>6.2f}")
    print(f"{'attribution s':<34} {t_attr_one:>10.1f} {t_attr_par:>10.1f} {t_attr_one / t_attr_par:>6.2f}")
    print(f"{'pool start s (once)':<34} {'':>10} {t_pool:>10.1f}")
    same = sum(gen_par[i] == gen_one1[i] for i in gen_one1)
    print(f"answers equal to one process (1 thread): {same}/{len(gen_one1)}; to one process ({args.threads} threads): "
          f"{sum(gen_par[i] == gen_one[i] for i in gen_one)}/{len(gen_one)} ({n_tokens} tokens)")
    print(f"W: same names {W_par.src_names == W_one.src_names and W_par.dst_names == W_one.dst_names}; max |dW| / "
          f"max |W| of the sample: {rel(W_par, W_one1):.2e} against one process with 1 thread, {rel(W_par, W_one):.2e} "
          f"against {args.threads} threads (one process, 1 vs {args.threads} threads: {rel(W_one1, W_one):.2e})")


if __name__ == "__main__":
    main()
