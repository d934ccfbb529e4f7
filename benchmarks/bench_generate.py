"""Batched greedy generation against one question at a time, measured in the same run.

Both modes go through the same code (`circuitdiff.decoding.HFBackend`): the baseline calls it
with one prompt at a time (no padding), the batched mode with `--batch-size` prompts per call
(left padding, KV cache). Prints seconds, generated tokens, tokens/s, the speed ratio and how
many answers agree token for token.

    nice -n 19 python benchmarks/bench_generate.py --n 64 --max-new-tokens 128 --batch-size 32
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--n", type=int, default=64, help="questions (the first n of the test split)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt", default="chat")
    args = parser.parse_args()

    import torch

    from circuitdiff.data import load_problems
    from circuitdiff.decoding import HFBackend
    from circuitdiff.models import load_model
    from circuitdiff.prompts import encode

    loaded = load_model(args.model, args.dtype)
    problems = load_problems(args.dataset, limit=args.n)
    prompts = [encode(p.question, loaded.tokenizer, args.prompt) for p in problems]
    backend = HFBackend(loaded.model, loaded.tokenizer, args.max_new_tokens)
    backend.generate(prompts[:2])  # warm-up (allocator, kernels)

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # as generate_dataset batches them
    t0 = time.perf_counter()
    batched = [None] * len(prompts)
    for start in range(0, len(order), args.batch_size):
        chunk = order[start : start + args.batch_size]
        for i, gen in zip(chunk, backend.generate([prompts[i] for i in chunk])):
            batched[i] = gen
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    single = [backend.generate([p])[0] for p in prompts]
    t_single = time.perf_counter() - t0

    from circuitdiff.grade import accuracy, grade

    tokens = sum(len(g.answer_ids) for g in single)
    acc = accuracy([grade(loaded.tokenizer.decode(g.answer_ids, skip_special_tokens=True), p.gold, p.kind).correct
                    for g, p in zip(single, problems)])
    same = sum(a.answer_ids == b.answer_ids for a, b in zip(batched, single))
    print(f"model={args.model} dtype={args.dtype} threads={torch.get_num_threads()} dataset={args.dataset} "
          f"n={len(prompts)} max_new_tokens={args.max_new_tokens} prompt={args.prompt} (greedy)")
    print(f"one at a time : {t_single:8.1f} s  {tokens} tokens  {tokens / t_single:7.1f} tok/s")
    print(f"batched (bs={args.batch_size:<3}): {t_batched:8.1f} s  {tokens} tokens  {tokens / t_batched:7.1f} tok/s")
    print(f"speed-up (one at a time / batched): {t_single / t_batched:.2f}x")
    print(f"answers identical token for token: {same}/{len(prompts)} "
          f"(left padding changes float rounding; greedy ties can flip)")
    print(f"accuracy (one at a time): {acc}; {sum(g.stop == 'length' for g in single)} answers hit max_new_tokens")


if __name__ == "__main__":
    main()
