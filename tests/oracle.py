"""Independent oracles for edge scores.

`naive_gated_forward` re-implements a Llama-family decoder (Llama, Mistral, Qwen2,
Qwen3) from its weights with plain tensor algebra, in which every destination's
input is rebuilt explicitly as the sum of the source outputs, each times its own
scalar gate. With all gates at 1 it is the model; the edge score is then simply
-dL/dgate, computed by autograd (design.md check 1). It shares no code with the
engine: no hooks, no norm VJP, no buffers. Only the rotary cos/sin table is taken
from the model (a fixed function of the positions, computed in float32 by HF).

`composed_gated_forward` does the same at block level for any adapter by calling the
model's own submodules (used for Gemma, whose post-norms the naive one lacks).
"""

from __future__ import annotations

import contextlib

import inspect
import math

import torch

from circuitdiff.graph import Graph


def _rms(x, weight, eps, one_plus=False):
    w = 1.0 + weight if one_plus else weight
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _linear(x, module):
    y = x @ module.weight.T
    return y + module.bias if module.bias is not None else y


class Gates:
    """One scalar gate per (destination, source) edge, all 1, requiring grad.

    `probe`: fixed tensors (e.g. the clean run's source outputs), one per source, added to each destination
    input with their own zero-valued gates `probe_values`: -dL/dprobe_value[d, u] = -<dL/dx_d, probe[u]>."""

    def __init__(self, graph: Graph, dtype, probe: list | None = None):
        self.graph = graph
        self.values = torch.ones(len(graph.dst_names), len(graph.src_names), dtype=dtype, requires_grad=True)
        self.mask = torch.as_tensor(graph.edge_mask)
        self.probe = probe
        self.probe_values = torch.zeros(len(graph.dst_names), len(graph.src_names), dtype=dtype, requires_grad=True)

    def mix(self, dst_name: str, sources: list[torch.Tensor]) -> torch.Tensor:
        """Input of destination `dst_name`: sum over the sources before it, each times its gate."""
        d = self.graph.dst_index[dst_name]
        n = int(self.mask[d].sum())
        assert n == len(sources), (dst_name, n, len(sources))
        stacked = torch.stack(sources[:n], dim=0)  # [n, batch, pos, d]
        x = torch.einsum("s,sbtd->btd", self.values[d, :n], stacked)
        if self.probe is not None:
            x = x + torch.einsum("s,sbtd->btd", self.probe_values[d, :n], torch.stack(self.probe[:n], dim=0))
        return x


def _loss(logits, samples):
    total = 0.0
    for row, s in enumerate(samples):
        p, cut = len(s["prompt_ids"]), s["cut_len"]
        logp = torch.log_softmax(logits[row, p - 1 : p - 1 + cut], dim=-1)
        target = torch.tensor(s["answer_ids"][:cut])
        total = total - logp[torch.arange(cut), target].mean()
    return total


def _inputs(samples):
    seqs = [s["prompt_ids"] + s["answer_ids"][: s["cut_len"]] for s in samples]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
    return ids, mask


def naive_gated_forward(model, samples, granularity="block", embed_scale=1.0, probe=None, objective="nll", keep=None):
    """(loss, gates, logits) of a Llama-family model rebuilt from its weights with per-edge gates.

    embed_scale multiplies the embedding (the integrated-gradient path); probe: see Gates; objective "logit":
    minus the mean centred logit of the answer tokens; keep: a list that receives the source outputs."""
    config = model.config
    base = model.model
    n_layers = len(base.layers)
    attn0 = base.layers[0].self_attn
    dh = attn0.head_dim
    H = attn0.q_proj.out_features // dh
    KV = attn0.k_proj.out_features // dh
    dtype = base.embed_tokens.weight.dtype
    graph = Graph(n_layers, granularity, H, KV)
    gates = Gates(graph, dtype, probe)

    ids, mask = _inputs(samples)
    n_batch, n_pos = ids.shape
    positions = torch.arange(n_pos)[None].expand(n_batch, -1)
    cos, sin = base.rotary_emb(base.embed_tokens.weight[:1][None], positions)
    cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)  # [b, 1, pos, dh]
    causal = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool))
    allowed = causal[None, None] & mask[:, None, None, :]  # [b, 1, q, k]

    sources = keep if keep is not None else []
    sources.append(base.embed_tokens.weight[ids] * embed_scale)
    for l, layer in enumerate(base.layers):
        attn = layer.self_attn
        norm = lambda x: _rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)

        def proj_heads(x, module, head, n):
            w = module.weight.view(n, dh, -1)[head]
            y = x @ w.T
            if module.bias is not None:
                y = y + module.bias.view(n, dh)[head]
            return y  # [b, pos, dh]

        def qk_norm(y, module_name):
            sub = getattr(attn, module_name, None)
            return _rms(y, sub.weight, sub.variance_epsilon) if sub is not None else y

        if granularity == "block":
            x = norm(gates.mix(f"attn.{l}", sources))
            xq = [x] * H
            xk = xv = [x] * KV
        elif granularity == "qkv":
            xq = [norm(gates.mix(f"attn.{l}.q", sources))] * H
            xk = [norm(gates.mix(f"attn.{l}.k", sources))] * KV
            xv = [norm(gates.mix(f"attn.{l}.v", sources))] * KV
        else:
            xq = [norm(gates.mix(f"attn.{l}.h{h}.q", sources)) for h in range(H)]
            xk = [norm(gates.mix(f"attn.{l}.kv{g}.k", sources)) for g in range(KV)]
            xv = [norm(gates.mix(f"attn.{l}.kv{g}.v", sources)) for g in range(KV)]

        keys = [_rotate(qk_norm(proj_heads(xk[g], attn.k_proj, g, KV), "k_norm")[:, None], cos, sin)[:, 0] for g in range(KV)]
        values = [proj_heads(xv[g], attn.v_proj, g, KV) for g in range(KV)]
        head_outputs = []
        for h in range(H):
            g = h // (H // KV)
            q = _rotate(qk_norm(proj_heads(xq[h], attn.q_proj, h, H), "q_norm")[:, None], cos, sin)[:, 0]
            scores = q @ keys[g].transpose(1, 2) / math.sqrt(dh)
            scores = scores.masked_fill(~allowed[:, 0], float("-inf"))
            z = torch.softmax(scores, dim=-1) @ values[g]  # [b, pos, dh]
            w_o = attn.o_proj.weight[:, h * dh : (h + 1) * dh]
            head_outputs.append(z @ w_o.T)
        if granularity == "head":
            sources += head_outputs
        else:
            sources.append(sum(head_outputs))

        mlp = layer.mlp
        xm = _rms(gates.mix(f"mlp.{l}", sources), layer.post_attention_layernorm.weight,
                  layer.post_attention_layernorm.variance_epsilon)
        sources.append(_linear(torch.nn.functional.silu(_linear(xm, mlp.gate_proj)) * _linear(xm, mlp.up_proj), mlp.down_proj))

    final = _rms(gates.mix("logits", sources), base.norm.weight, base.norm.variance_epsilon)
    logits = final @ model.lm_head.weight.T
    return (_loss(logits, samples) if objective == "nll" else _logit_loss(logits, samples)), gates, logits


def _logit_loss(logits, samples):
    total = 0.0
    for row, s in enumerate(samples):
        p, cut = len(s["prompt_ids"]), s["cut_len"]
        picked = logits[row, p - 1 : p - 1 + cut]
        target = torch.tensor(s["answer_ids"][:cut])
        total = total - (picked[torch.arange(cut), target] - picked.mean(-1)).mean()
    return total


def ig_integrand(model, sample, t, clean_sources, granularity="block", objective="nll"):
    """[n_dst, n_src]: -<dL/dx_d at the input scaled by t, O_u of the clean input>, by autograd on the probes."""
    loss, gates, _ = naive_gated_forward(model, [sample], granularity, embed_scale=t,
                                         probe=[c.detach() for c in clean_sources], objective=objective)
    (grad,) = torch.autograd.grad(loss, gates.probe_values)
    return -grad


def composed_gated_forward(model, adapter, samples):
    """Block-level gated forward that calls the model's own submodules (one sample, no padding)."""
    from circuitdiff.models.adapters import get_module

    assert len(samples) == 1
    base = get_module(model, adapter.backbone)
    layers = get_module(model, adapter.layers)
    dtype = next(model.parameters()).dtype
    graph = Graph(len(layers), "block")
    gates = Gates(graph, dtype)
    ids, _ = _inputs(samples)
    n_pos = ids.shape[1]
    positions = torch.arange(n_pos)[None]
    inputs_embeds = base.get_input_embeddings()(ids)  # Gemma's embedding module applies its own scale
    causal = torch.full((n_pos, n_pos), float("-inf"), dtype=dtype).triu(1)[None, None]
    sources = [inputs_embeds]
    for l, layer in enumerate(layers):
        attn = get_module(layer, adapter.attn)
        rotary = base.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            pos_emb = rotary(inputs_embeds, positions, model.config.layer_types[l])
        else:
            pos_emb = rotary(inputs_embeds, positions)
        x = get_module(layer, adapter.attn_norm)(gates.mix(f"attn.{l}", sources))
        out = attn(hidden_states=x, position_embeddings=pos_emb, attention_mask=causal)[0]
        if adapter.attn_out != adapter.attn:
            out = get_module(layer, adapter.attn_out)(out)
        sources.append(out)
        x = get_module(layer, adapter.mlp_norm)(gates.mix(f"mlp.{l}", sources))
        out = get_module(layer, "mlp")(x)
        if adapter.mlp_out != "mlp":
            out = get_module(layer, adapter.mlp_out)(out)
        sources.append(out)
    hidden = get_module(model, adapter.final_norm)(gates.mix("logits", sources))
    logits = get_module(model, adapter.lm_head)(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return _loss(logits, samples), gates, logits


def oracle_scores(forward, *args, **kwargs):
    """(W [n_dst, n_src] summed over the samples = -dL/dgate, logits)."""
    loss, gates, logits = forward(*args, **kwargs)
    (grad,) = torch.autograd.grad(loss, gates.values)
    return -grad, logits.detach()


@contextlib.contextmanager
def preset_gates(gates: dict):
    """Inside the block, every oracle forward builds its Gates with gates[(dst, src)] = value (others 1)."""
    global Gates
    original = Gates

    class Preset(original):
        def __init__(self, graph, dtype, probe=None):
            super().__init__(graph, dtype, probe)
            with torch.no_grad():
                for (dst, src), value in gates.items():
                    self.values[graph.dst_index[dst], graph.src_index[src]] = value

    Gates = Preset
    try:
        yield
    finally:
        Gates = original
