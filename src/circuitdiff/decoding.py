"""Greedy decoding backends: batched answers for lists of prompt token ids.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from circuitdiff.errors import UserError


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
