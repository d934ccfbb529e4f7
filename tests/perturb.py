"""Edge perturbation on the plain Hugging Face model, built independently of the engine.

`loss_with_edge_removed(model, samples, dst, src, eps)` runs the model with eps times
source `src`'s output taken out of destination `dst`'s input only (eps=1: the edge
is ablated) and returns the batch loss computed from the model's own logits.
It first runs a clean forward to record the source outputs (module outputs, or
o_proj's input split per head), then a second forward in which a hook edits
exactly one destination input.
"""

from __future__ import annotations

import torch

from circuitdiff.graph import parse_node
from circuitdiff.models.adapters import adapter_for, get_module


def plain_loss(model, samples) -> torch.Tensor:
    """Sum over samples of the mean NLL of answer_ids[:cut_len], from model(...).logits."""
    total = 0.0
    for s in samples:
        ids = torch.tensor([s["prompt_ids"] + s["answer_ids"][: s["cut_len"]]])
        logits = model(ids).logits[0].to(torch.float64)
        p, cut = len(s["prompt_ids"]), s["cut_len"]
        logp = torch.log_softmax(logits[p - 1 : p - 1 + cut], dim=-1)
        total = total - logp[torch.arange(cut), torch.tensor(s["answer_ids"][:cut])].mean()
    return total


def _record_source(model, adapter, layers, src: str, samples) -> list[torch.Tensor]:
    kind, layer, rest = parse_node(src)
    outputs = []
    if kind == "embed":
        module, grab = get_module(layers[0], adapter.attn_norm), "pre"
    elif kind == "attn" and rest is not None:  # head source: o_proj input, head slice, through W_O
        module, grab = get_module(get_module(layers[layer], adapter.attn), adapter.o_proj), "head"
    elif kind == "attn":
        module, grab = get_module(layers[layer], adapter.attn_out), "out"
    else:
        module, grab = get_module(layers[layer], adapter.mlp_out), "out"

    def pre(mod, args):
        if grab == "pre":
            outputs.append(args[0].detach().clone())
        elif grab == "head":
            h = int(rest[1:])
            dh = model.config.head_dim if hasattr(model.config, "head_dim") and model.config.head_dim else None
            dh = dh or mod.in_features // model.config.num_attention_heads
            z = args[0].detach()[..., h * dh : (h + 1) * dh]
            outputs.append(z @ mod.weight[:, h * dh : (h + 1) * dh].T)

    def post(mod, args, out):
        if grab == "out":
            outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            for s in samples:
                model(torch.tensor([s["prompt_ids"] + s["answer_ids"][: s["cut_len"]]]))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def loss_with_edge_removed(model, samples, dst: str, src: str, eps: float = 1.0) -> float:
    adapter = adapter_for(model)
    layers = get_module(model, adapter.layers)
    recorded = _record_source(model, adapter, layers, src, samples)
    kind, layer, rest = parse_node(dst)
    current = {"i": 0}

    def removed(x):
        return x - eps * recorded[current["i"]].to(x.dtype)

    handles = []
    if kind == "logits":
        target = get_module(model, adapter.final_norm)
        handles.append(target.register_forward_pre_hook(lambda m, a: (removed(a[0]),) + a[1:]))
    elif kind == "mlp":
        target = get_module(layers[layer], adapter.mlp_norm)
        handles.append(target.register_forward_pre_hook(lambda m, a: (removed(a[0]),) + a[1:]))
    elif rest is None:  # attention block input
        target = get_module(layers[layer], adapter.attn_norm)
        handles.append(target.register_forward_pre_hook(lambda m, a: (removed(a[0]),) + a[1:]))
    else:  # q/k/v input (qkv) or one head / kv group (head): recompute that projection from the edited input
        norm = get_module(layers[layer], adapter.attn_norm)
        attn = get_module(layers[layer], adapter.attn)
        saved = {}
        handles.append(norm.register_forward_pre_hook(lambda m, a: saved.__setitem__("x", a[0])))
        parts = rest.split(".")
        proj = get_module(attn, getattr(adapter, f"{parts[-1]}_proj"))
        if len(parts) == 1:
            handles.append(proj.register_forward_pre_hook(lambda m, a: (norm.forward(removed(saved["x"])),) + a[1:]))
        else:
            index = int(parts[0].lstrip("hkv"))
            dh = proj.out_features // (model.config.num_attention_heads if parts[-1] == "q" else model.config.num_key_value_heads)

            def edit(m, a, out):
                fresh = m.forward(norm.forward(removed(saved["x"])))
                out = out.clone()
                out[..., index * dh : (index + 1) * dh] = fresh[..., index * dh : (index + 1) * dh]
                return out

            handles.append(proj.register_forward_hook(edit))
    try:
        with torch.no_grad():
            total = 0.0
            for i, s in enumerate(samples):
                current["i"] = i
                total += float(plain_loss(model, [s]))
    finally:
        for handle in handles:
            handle.remove()
    return total


def gradient_at_input(model, sample, dst: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx_d, x_d) for a block-level destination, via an added zero tensor on d's input."""
    adapter = adapter_for(model)
    layers = get_module(model, adapter.layers)
    kind, layer, _ = parse_node(dst)
    module = {
        "logits": lambda: get_module(model, adapter.final_norm),
        "mlp": lambda: get_module(layers[layer], adapter.mlp_norm),
        "attn": lambda: get_module(layers[layer], adapter.attn_norm),
    }[kind]()
    box = {}

    def hook(m, args):
        delta = torch.zeros_like(args[0], requires_grad=True)
        box["delta"], box["x"] = delta, args[0].detach()
        return (args[0] + delta,) + args[1:]

    handle = module.register_forward_pre_hook(hook)
    try:
        loss = plain_loss(model, [sample])
        (grad,) = torch.autograd.grad(loss, box["delta"])
    finally:
        handle.remove()
    return grad, box["x"]
