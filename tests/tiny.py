"""Tiny random-config models (no download) for exactness tests.

Hugging Face RMSNorms compute in float32 even inside a float64 model, and that
rounding (~1e-7) would cap every float64 comparison. `exact_norms` gives a tiny
model norms that compute in the model's own dtype (same formula), so the checks
can run at float64 precision; a separate test covers the stock norms.
"""

from __future__ import annotations

import types

import torch
import transformers

COMMON = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=3, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0),
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=6),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=4, sliding_window=64, query_pre_attn_scalar=4
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=4, sliding_window=64, query_pre_attn_scalar=4
    ),
}

LLAMA_FAMILY = ["llama", "mistral", "qwen2", "qwen3"]


def _rms_plain(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rms_one_plus(self, x):
    return (1.0 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def exact_norms(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            if name.startswith("Gemma"):
                module.forward = types.MethodType(_rms_one_plus, module)
            else:
                module.forward = types.MethodType(_rms_plain, module)
    return model


def tiny_model(arch: str, dtype=torch.float64, seed: int = 0, exact: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config._attn_implementation = "eager" if arch.startswith("gemma") else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    # random norm weights and biases, so nothing is trivially 1 or 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "norm" in name and not arch.startswith("gemma") else 0.0))
    model = model.to(dtype).eval()
    return exact_norms(model) if exact else model


def float64_rtol(model: torch.nn.Module) -> float:
    """How closely two float64 computations of one loss can agree, relative to its size, on any CPU.

    Every float64 operation rounds at ~1.1e-16 relative; these tiny models chain a few hundred
    of them, and CPUs differ in how their BLAS kernels order a reduction (Intel and AMD builds
    of MKL/oneDNN do), so two correct paths agree to ~1e-14 relative; 1e-10 leaves four orders of
    headroom and still fails any real error (a wrong edge moves the loss by >1e-5). Gemma's eager
    attention computes its softmax in float32 and casts back (transformers upcasts it), so there
    two float64 paths whose inputs differ in the last bits can land on different float32
    roundings of an attention weight (~6e-8 relative): 1e-6 relative for Gemma. (On an AMD EPYC a
    Gemma-2 loss of 4.15 differed by 3.6e-9 between two correct paths.)
    """
    return 1e-6 if model.config.model_type.startswith("gemma") else 1e-10


def tiny_samples(seed: int = 0, n: int = 3, vocab: int = 61) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        p_len = 3 + int(torch.randint(0, 5, (1,), generator=g))
        a_len = 2 + int(torch.randint(0, 6, (1,), generator=g))
        samples.append(
            {
                "prompt_ids": torch.randint(1, vocab, (p_len,), generator=g).tolist(),
                "answer_ids": torch.randint(1, vocab, (a_len,), generator=g).tolist(),
                "cut_len": 1 + int(torch.randint(0, a_len, (1,), generator=g)),
            }
        )
    return samples
