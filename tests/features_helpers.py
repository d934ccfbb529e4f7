"""Offline helpers for the feature-diffing tests: a tiny model pair on disk and a run directory that names it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from circuitdiff import io
from circuitdiff.store import layout
from circuitdiff.store.artifacts import with_check
from pipeline_helpers import byte_tokenizer, save_tiny_lm


def save_perturbed(base_dir: Path, out: Path, seed: int = 1, scale: float = 0.3, layers=(0,)) -> Path:
    """A copy of the model in base_dir whose MLP weights in `layers` are moved by scale * N(0, 1) * their std."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for param in model.model.layers[layer].mlp.parameters():
                param.add_(scale * param.std() * torch.randn(param.shape, generator=g))
    model.save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    return out


def tiny_pair(root: Path) -> tuple[Path, Path]:
    base = save_tiny_lm(Path(root) / "base", seed=0)
    return base, save_perturbed(base, Path(root) / "tuned")


def write_run(run: Path, base: Path, tuned: Path, n: int = 16, answer_len: int = 12, datasets=("gsm8k",)) -> Path:
    """A run directory with a manifest and generations: prompts and answers from the byte tokenizer; the tuned
    model is 'correct' on even idx, the base on every third idx (so both-wrong, tuned-only and base-only exist)."""
    tok = byte_tokenizer()
    io.write_json(layout.manifest(run), {"config": {"base": {"spec": str(base)}, "tuned": {"spec": str(tuned)},
                                                    "dtype": "float32", "max_new_tokens": 6,
                                                    "grading": {"truncated": "lenient"}}})
    for dataset in datasets:
        for role in ("base", "tuned"):
            rows = []
            for i in range(n):
                prompt = tok(f"Q: what is {i} plus {2 * i}?\nA:")["input_ids"]
                answer = tok(f" {i} + {2 * i} = {3 * i + (role == 'base')} because{' .' * 8}")["input_ids"][:answer_len]
                correct = i % 2 == 0 if role == "tuned" else i % 3 == 0
                rows.append(with_check({"idx": i, "question": f"what is {i} plus {2 * i}?", "gold": str(3 * i),
                                        "kind": "numeric", "prompt_ids": prompt, "answer_ids": answer,
                                        "answer_text": tok.decode(answer), "stop": "eos", "prediction": str(3 * i),
                                        "truncated": False, "correct": correct}))
            io.write_jsonl(layout.generations(run, role, dataset), rows)
    return run
