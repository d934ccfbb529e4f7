"""Several models on the same tokens at one layer: read a residual stream, or edit one model's from all of theirs.

- `capture(model, layer, ...)`: the residual after decoder layer `layer` [batch, pos, d_model]; the layers
  above it are not run.
- `lockstep(target, partners, layer, edit)`: while active, every forward of the target's backbone first
  runs each partner's backbone on the same inputs (ids, mask, position ids; a KV cache of its own when the
  target uses one, renewed at each prefill) up to `layer`, then replaces the target's residual h after
  `layer` by edit(h, [partner residuals]). Greedy generation with the target's KV cache therefore edits
  every new position from every model's residual at that position: the same model as a recomputation of
  the whole sequence.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from circuitdiff.errors import UserError
from circuitdiff.models.adapters import adapter_for, get_module


class _Stop(Exception):
    """Raised by a capture hook once the wanted layer has run."""


def layers_of(model: torch.nn.Module):
    return get_module(model, adapter_for(model).layers)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    return get_module(model, adapter_for(model).backbone)


def n_layers(model: torch.nn.Module) -> int:
    return len(layers_of(model))


def check_layer(model: torch.nn.Module, layer: int, name: str = "the model") -> int:
    n = n_layers(model)
    if not 0 <= int(layer) < n:
        raise UserError(f"--layer {layer} is out of range: {name} has {n} decoder layers (0..{n - 1}); "
                        f"pick one of them (default: the middle, {n // 2})")
    return int(layer)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, h):
    return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


@contextlib.contextmanager
def _stop_after(model: torch.nn.Module, layer: int, store: list):
    def hook(module, args, output):
        store.append(_first(output))
        raise _Stop

    handle = layers_of(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def capture(model: torch.nn.Module, layer: int, **inputs) -> torch.Tensor:
    """The residual after decoder layer `layer` [batch, pos, d_model] for backbone inputs (input_ids, attention_mask,
    ...), without gradient."""
    store: list = []
    with _stop_after(model, layer, store):
        try:
            backbone_of(model)(**inputs)
        except _Stop:
            pass
    if not store:
        raise RuntimeError(f"layer {layer} did not run")
    return store[0]


@contextlib.contextmanager
def lockstep(target: torch.nn.Module, partners: Sequence[torch.nn.Module], layer: int,
             edit: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]):
    """See the module docstring; edit(h [batch, pos, d], partner residuals) -> the new h (same shape)."""
    from transformers import DynamicCache

    state: dict = {"caches": [None] * len(partners), "partner_h": []}

    def before(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise UserError("lockstep runs on token ids, not input embeddings")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = bool(kwargs.get("use_cache")) and cache is not None
        if use_cache and cache.get_seq_length() == 0:  # a prefill: the partners start caches of their own
            state["caches"] = [DynamicCache(config=p.config) for p in partners]
        hs = []
        for p, partner in enumerate(partners):
            extra = {"cache": state["caches"][p], "use_cache": True} if use_cache else {"use_cache": False}
            hs.append(capture(partner, layer, input_ids=input_ids, attention_mask=kwargs.get("attention_mask"),
                              position_ids=kwargs.get("position_ids"), **extra))  # no gradient flows into partners
        state["partner_h"] = hs

    def after(module, args, output):
        return _replace(output, edit(_first(output), state["partner_h"]))

    handles = [backbone_of(target).register_forward_pre_hook(before, with_kwargs=True),
               layers_of(target)[layer].register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
