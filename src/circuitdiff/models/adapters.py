"""One small record per architecture: where the engine finds each node.

A source is what a block adds to the residual stream; a destination is the
tensor that enters a block's (pre-)norm. Everything else about the model is
left alone: no weight conversion, no processing, the logits stay those of the
plain Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitdiff.errors import UserError


@dataclass(frozen=True)
class Adapter:
    name: str
    backbone: str = "model"  # the decoder stack returning last_hidden_state (final norm applied)
    layers: str = "model.layers"
    final_norm: str = "model.norm"  # its input is the `logits` destination
    lm_head: str = "lm_head"
    # relative to one decoder layer:
    attn: str = "self_attn"
    attn_norm: str = "input_layernorm"  # its input is the attention destination
    attn_out: str = "self_attn"  # its output (first element) is the attention source
    mlp_norm: str = "post_attention_layernorm"  # its input is the MLP destination
    mlp_out: str = "mlp"  # its output is the MLP source
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"

    @property
    def heads_are_additive(self) -> bool:
        """Per-head sources sum to the block's output only when nothing nonlinear follows o_proj."""
        return self.attn_out == self.attn


_LLAMA_LIKE = Adapter(name="llama")
_GEMMA_POSTNORM = Adapter(
    name="gemma2",
    attn_out="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_out="post_feedforward_layernorm",
)

# model_type (config.json) -> adapter. DeepSeek-Math and SmolLM2 are `llama`.
ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": Adapter(name="mistral"),
    "qwen2": Adapter(name="qwen2"),
    "qwen3": Adapter(name="qwen3"),
    "gemma": Adapter(name="gemma"),
    "gemma2": _GEMMA_POSTNORM,
    "gemma3_text": Adapter(
        name="gemma3_text",
        attn_out="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_out="post_feedforward_layernorm",
    ),
}


def adapter_for(model: torch.nn.Module) -> Adapter:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(
            f"architecture {model_type!r} is not supported (supported: {', '.join(sorted(ADAPTERS))}); "
            "add a record to ADAPTERS in circuitdiff/models/adapters.py"
        )
    if getattr(config, "pretraining_tp", 1) != 1:
        raise UserError(
            f"config.pretraining_tp={config.pretraining_tp}: set it to 1 (it only splits matmuls and changes no weights)"
        )
    return ADAPTERS[model_type]


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class Shape:
    """The sizes the graph needs, read from the model itself."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int


def model_shape(model: torch.nn.Module, adapter: Adapter) -> Shape:
    layers = get_module(model, adapter.layers)
    attn = get_module(layers[0], adapter.attn)
    q = get_module(attn, adapter.q_proj)
    k = get_module(attn, adapter.k_proj)
    config = model.config
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    head_dim = head_dim or config.hidden_size // config.num_attention_heads
    return Shape(
        n_layers=len(layers),
        n_heads=q.out_features // head_dim,
        n_kv_heads=k.out_features // head_dim,
        head_dim=head_dim,
        d_model=q.in_features,
    )
