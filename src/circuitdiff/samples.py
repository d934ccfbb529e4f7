"""Attribution samples: ``{"prompt_ids": [...], "answer_ids": [...], "cut_len": K}``, checked.

The objective reads answer_ids[:K] given the prompt. A samples file holds one JSON object per line.
"""

from __future__ import annotations

import json
from pathlib import Path

from circuitdiff.errors import UserError


def _is_id(t) -> bool:
    """A token id: a non-negative int (a bool is not one, although Python counts it as an int)."""
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def check_sample(sample: dict, where: str) -> dict:
    """One sample, validated; `where` names it in the error (e.g. 'samples.jsonl line 3')."""
    if not isinstance(sample, dict):
        raise UserError(f"{where}: a sample is a JSON object {{prompt_ids, answer_ids, cut_len}}, not "
                        f"{type(sample).__name__}")
    for key in ("prompt_ids", "answer_ids", "cut_len"):
        if key not in sample:
            raise UserError(f"{where}: missing {key!r}; each sample needs prompt_ids, answer_ids and cut_len")
    prompt, answer, cut = sample["prompt_ids"], sample["answer_ids"], sample["cut_len"]
    if not isinstance(prompt, list) or not prompt or not all(_is_id(t) for t in prompt):
        raise UserError(f"{where}: prompt_ids must be a non-empty list of token ids (non-negative integers)")
    if not isinstance(answer, list) or not all(_is_id(t) for t in answer):
        raise UserError(f"{where}: answer_ids must be a list of token ids (non-negative integers)")
    if not isinstance(cut, int) or isinstance(cut, bool) or not 1 <= cut <= len(answer):
        raise UserError(f"{where}: cut_len={cut!r} must be an integer in [1, len(answer_ids)={len(answer)}]")
    return {"prompt_ids": prompt, "answer_ids": answer, "cut_len": cut}


def read_samples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"samples file {path} does not exist; check the path")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path} line {number}: not valid JSON ({err.msg})") from None
                samples.append(check_sample(row, f"{path} line {number}"))
    if not samples:
        raise UserError(f"{path} holds no samples; write one JSON object per line")
    return samples


def as_samples(samples: str | Path | list[dict]) -> list[dict]:
    """A samples file (JSONL) or a list of sample dicts, validated; at least one."""
    if isinstance(samples, (str, Path)):
        return read_samples(samples)
    checked = [check_sample(s, f"sample {i}") for i, s in enumerate(samples)]
    if not checked:
        raise UserError("no samples given; pass at least one {prompt_ids, answer_ids, cut_len}")
    return checked


def check_vocabulary(samples: list[dict], vocab_size: int, where: str = "sample", numbers=None) -> None:
    """Every token id inside the model's vocabulary (else the embedding fails with an IndexError); `numbers`: each
    sample's number in the message (default its position)."""
    for k, s in enumerate(samples):
        top = max(s["prompt_ids"] + list(s["answer_ids"][: s["cut_len"]]))
        if top >= vocab_size:
            raise UserError(f"{where} {k if numbers is None else numbers[k]}: token id {top} is outside the model's vocabulary ({vocab_size} ids); "
                            "the samples were made with another tokenizer")
