"""Greedy answers for every question, batched, appended to a JSONL file batch by batch.

Conventions:
- Greedy decoding (no sampling), at most ``max_new_tokens`` new tokens, stop at the first
  EOS token (the tokenizer's EOS and every id in the model's ``generation_config.eos_token_id``).
- ``answer_ids``: the generated tokens BEFORE the EOS (the EOS itself is not stored, so the
  answer length T is the number of tokens the model wrote); ``stop`` is ``"eos"`` or
  ``"length"`` (hit ``max_new_tokens``).
- Hugging Face backend: batches of prompts, left-padded, one ``model.generate`` call per batch
  with the KV cache; questions are sorted by prompt length (longest first) so a batch holds
  similar lengths and an out-of-memory error shows up in the first batch.
- vLLM backend (``backend="vllm"``): used only when the package is installed.

Resume: `generate_dataset` reads the rows already in the file, skips those idx, and appends
the rows of each finished batch with `append_jsonl` (flushed and fsynced); a line cut off by
a kill is dropped and the file rewritten atomically before appending again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from circuitdiff.data import Problem
from circuitdiff.errors import UserError
from circuitdiff.grade import grade
from circuitdiff.io import append_jsonl, read_jsonl_tolerant, write_jsonl


@dataclass(frozen=True)
class Generation:
    answer_ids: list[int]
    stop: str  # "eos" | "length"


class Backend(Protocol):
    name: str

    def generate(self, prompts: Sequence[list[int]]) -> list[Generation]: ...


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends an answer: the tokenizer's EOS and the generation config's."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (getattr(tokenizer, "eos_token_id", None), configured):
        if value is None:
            continue
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise UserError("the tokenizer defines no EOS token; set tokenizer.eos_token (generation could not stop)")
    return ids


def _cut_at_eos(tokens: list[int], eos: set[int]) -> Generation:
    for pos, token in enumerate(tokens):
        if token in eos:
            return Generation(tokens[:pos], "eos")
    return Generation(tokens, "length")


class HFBackend:
    """Batched greedy generation with `model.generate` (left padding, KV cache)."""

    name = "hf"

    def __init__(self, model, tokenizer, max_new_tokens: int):
        from transformers import GenerationConfig

        self.model = model
        self.eos = eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos[0]
        self.max_new_tokens = int(max_new_tokens)
        self.config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    @torch.inference_mode()
    def generate(self, prompts: Sequence[list[int]]) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        device = getattr(self.model, "device", torch.device("cpu"))
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self.config,
        )
        new_tokens = out[:, width:].tolist()
        eos = set(self.eos)
        return [_cut_at_eos(tokens, eos) for tokens in new_tokens]


class VLLMBackend:
    """Greedy generation with vLLM (optional; only when the package is installed)."""

    name = "vllm"

    def __init__(self, spec: str, dtype: str, max_new_tokens: int, eos: list[int], **llm_kwargs):
        try:
            import vllm
        except ImportError:
            raise UserError("backend 'vllm' needs the package vllm (pip install vllm); or use backend: hf") from None
        from circuitdiff.models.loading import _materialise

        local, _ = _materialise(spec)
        model_id, _, revision = (str(local), "", "") if local is not None else spec.partition("@")
        self.llm = vllm.LLM(model=model_id, revision=revision or None, dtype=dtype, seed=0, **llm_kwargs)
        self.params = vllm.SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens), stop_token_ids=eos)
        self.eos = set(eos)

    def generate(self, prompts: Sequence[list[int]]) -> list[Generation]:
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], self.params, use_tqdm=False)
        results = []
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
            hit_eos = bool(tokens) and tokens[-1] in self.eos or out.outputs[0].finish_reason == "stop"
            while tokens and tokens[-1] in self.eos:
                tokens.pop()
            results.append(Generation(tokens, "eos" if hit_eos else "length"))
        return results


# ---------------------------------------------------------------- the stage

def read_rows(path: str | Path) -> list[dict]:
    """Rows already generated (a cut-off last line is ignored)."""
    return read_jsonl_tolerant(path)


def _repair(path: Path) -> list[dict]:
    """Drop a line cut off by a kill (rewriting the file atomically), so appending stays safe."""
    rows = read_rows(path)
    if path.exists():
        with open(path, "rb") as f:
            data = f.read()
        if data.count(b"\n") != len(rows) or (data and not data.endswith(b"\n")):
            write_jsonl(path, rows)
    return rows


def make_row(problem: Problem, prompt_ids: list[int], gen: Generation, decode: Callable[[list[int]], str]) -> dict:
    text = decode(gen.answer_ids)
    graded = grade(text, problem.gold, problem.kind)
    return {
        "idx": problem.idx,
        "question": problem.question,
        "gold": problem.gold,
        "kind": problem.kind,
        "prompt_ids": list(prompt_ids),
        "answer_ids": list(gen.answer_ids),
        "answer_text": text,
        "stop": gen.stop,
        "prediction": graded.prediction,
        "correct": graded.correct,
    }


def generate_dataset(
    path: str | Path,
    problems: Sequence[Problem],
    prompts: Sequence[list[int]],
    backend: Backend,
    decode: Callable[[list[int]], str],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
) -> list[dict]:
    """Generate the answers missing from `path` (one row per question, see `make_row`) and return all rows.

    Rows of finished batches are appended as soon as the batch ends; questions whose idx is
    already in the file are skipped.
    """
    from tqdm.auto import tqdm

    if len(problems) != len(prompts):
        raise ValueError("problems and prompts differ in length")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1")
    path = Path(path)
    done = {row["idx"] for row in _repair(path)}
    pending = [(p, ids) for p, ids in zip(problems, prompts) if p.idx not in done]
    pending.sort(key=lambda item: (-len(item[1]), item[0].idx))
    bar = tqdm(total=len(problems), initial=len(problems) - len(pending), desc=desc, unit="q",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            gens = backend.generate([ids for _, ids in batch])
            append_jsonl(path, [make_row(p, ids, g, decode) for (p, ids), g in zip(batch, gens)])
            bar.update(len(batch))
    finally:
        bar.close()
    return read_rows(path)


def regrade(rows: list[dict]) -> list[dict]:
    """Rows with `prediction` and `correct` recomputed from `answer_text` (after a grader change)."""
    out = []
    for row in rows:
        graded = grade(row["answer_text"], row["gold"], row.get("kind", "numeric"))
        out.append({**row, "prediction": graded.prediction, "correct": graded.correct})
    return out
