"""The floor any gradient method pays, shared by bench_attribute.py and gpu_check.py.

`plain_backward`: the model's forward, the same answer loss as the engine, and a backward to the
embedding output only (parameters frozen); optionally with the engine's per-layer activation
checkpointing. EAP's cost is measured against it in the same process.
"""

from __future__ import annotations

import torch


def plain_backward(model: torch.nn.Module, batch, checkpointing: bool = False) -> float:
    """One forward + input-only backward; returns the loss (the same objective as the engine's nll)."""
    from circuitdiff.engine import answer_loss
    from circuitdiff.engine.attributor import _checkpointed
    from circuitdiff.models.adapters import adapter_for, get_module

    adapter = adapter_for(model)
    model.requires_grad_(False)
    box = {}

    def leaf(module, args, out):
        box["leaf"] = out.detach().requires_grad_(True)
        return box["leaf"]

    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        with torch.enable_grad(), _checkpointed(get_module(model, adapter.layers), checkpointing):
            hidden = get_module(model, adapter.backbone)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                         use_cache=False).last_hidden_state
            loss = answer_loss(model, adapter, hidden, batch).sum()
            torch.autograd.grad(loss, box["leaf"])
    finally:
        handle.remove()
    return float(loss.detach())


def random_sample(vocab: int, n_tokens: int, seed: int = 0) -> dict:
    """prompt = answer = n_tokens / 2 random ids (>= 10), the objective on the whole answer."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, vocab, (n_tokens // 2,), generator=g).tolist()
    answer = torch.randint(10, vocab, (n_tokens - n_tokens // 2,), generator=g).tolist()
    return {"prompt_ids": prompt, "answer_ids": answer, "cut_len": len(answer)}
