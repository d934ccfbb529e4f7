"""Offline helpers for the pipeline tests: a byte-level tokenizer and tiny random Llama models on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHAT_TEMPLATE = (
    "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """258 tokens: <pad>=0, <eos>=1, then the 256 byte-level symbols; a small chat template."""
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_lm(seed: int = 0, eos_scale: float = 3.0, digit_scale: float = 1.5) -> transformers.LlamaForCausalLM:
    """A 2-layer random Llama over the byte vocabulary (weights drawn with std 0.5, so answers depend on
    the prompt). Its EOS and digit rows are scaled up so that greedy answers end at varied lengths and
    hold numbers (a very confused math model)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=1, pad_token_id=0, bos_token_id=None,
        tie_word_embeddings=False, initializer_range=0.5,
    )
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).eval()
    tok = byte_tokenizer()
    with torch.no_grad():
        model.lm_head.weight[1] *= eos_scale
        for digit in "0123456789":
            model.lm_head.weight[tok.convert_tokens_to_ids(digit)] *= digit_scale
    return model


def save_tiny_lm(path: Path, seed: int = 0, **kwargs) -> Path:
    path = Path(path)
    model = tiny_lm(seed, **kwargs)
    model.generation_config = transformers.GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def write_gsm8k_file(path: Path, golds: list[str], questions: list[str] | None = None) -> Path:
    """A dataset file in GSM8K format (question, answer '... #### gold')."""
    questions = questions or [f"Question {i}: what is {i} plus {2 * i}?" for i in range(len(golds))]
    with open(path, "w") as f:
        for q, g in zip(questions, golds):
            f.write(json.dumps({"question": q, "answer": f"work\n#### {g}"}) + "\n")
    return path
