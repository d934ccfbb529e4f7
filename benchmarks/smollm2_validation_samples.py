"""Samples for `circuitdiff validate` from a run's own greedy answers, correct or not.

The smoke run (SmolLM2-135M-Instruct on 40 GSM8K questions) answers about 1 question in 40
correctly, so its selection holds a single sample. This script takes instead the first N
questions (by idx) of generations/{role}/{dataset}.jsonl with a non-empty answer and cuts each
answer at cut_len = max(1, round(frac * len(answer_ids))) (default frac 0.1, the alpha=0.1 idea
applied per answer), writing one {"prompt_ids", "answer_ids", "cut_len", "idx"} per line.

    circuitdiff run smoke --out /tmp/val_smoke
    python benchmarks/smollm2_validation_samples.py /tmp/val_smoke --n 4 --out /tmp/val_smoke/validation_samples.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from circuitdiff.io import write_jsonl
from circuitdiff.store import artifacts


def build_samples(run_dir: str | Path, n: int = 4, frac: float = 0.1, role: str = "base", dataset: str = "gsm8k") -> list[dict]:
    rows = sorted(artifacts.read_generations(Path(run_dir), role, dataset), key=lambda r: r["idx"])
    rows = [r for r in rows if r["answer_ids"]][:n]
    if not rows:
        raise SystemExit(f"{run_dir}: no generations for {role}/{dataset}; run `circuitdiff run smoke --out {run_dir}` first")
    return [{"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"],
             "cut_len": max(1, round(frac * len(r["answer_ids"]))), "idx": r["idx"]} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--frac", type=float, default=0.1)
    p.add_argument("--role", default="base")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    samples = build_samples(args.run_dir, args.n, args.frac, args.role, args.dataset)
    write_jsonl(args.out, samples)
    print(f"wrote {args.out}: {len(samples)} samples, idx {[s['idx'] for s in samples]}, "
          f"prompt lengths {[len(s['prompt_ids']) for s in samples]}, cut_len {[s['cut_len'] for s in samples]}")


if __name__ == "__main__":
    main()
