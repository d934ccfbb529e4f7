"""Exactness of the EAP engine on tiny random float64 models (design.md checks 1-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import composed_gated_forward, naive_gated_forward, oracle_scores
from perturb import gradient_at_input, loss_with_edge_removed, plain_loss
from tiny import CONFIGS, LLAMA_FAMILY, float64_rtol, tiny_model, tiny_samples

from circuitdiff.attribute import attribute
from circuitdiff.engine import EdgeAttributor, make_batch
from circuitdiff.errors import UserError
from circuitdiff.graph import Graph
from circuitdiff.models.adapters import adapter_for

RTOL = 1e-8


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.abs(expected).max()
    assert scale > 1e-6, "reference scores are all ~0: the check would be vacuous"
    err = np.abs(actual - expected).max() / scale
    assert err < rtol, f"max error {err:.3e} (relative to max |ref| = {scale:.3e})"


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
def test_naive_oracle_is_the_model(arch):
    """The oracle is only an oracle if, with every gate at 1, it computes the model's logits."""
    model = tiny_model(arch)
    samples = tiny_samples(1, 1)
    _, _, logits = naive_gated_forward(model, samples)
    ids = torch.tensor([samples[0]["prompt_ids"] + samples[0]["answer_ids"][: samples[0]["cut_len"]]])
    plain = model(ids).logits.detach().numpy()
    np.testing.assert_allclose(logits.detach().numpy(), plain, rtol=0, atol=float64_rtol(model) * np.abs(plain).max())


@pytest.mark.parametrize("granularity", ["block", "qkv", "head"])
@pytest.mark.parametrize("arch", LLAMA_FAMILY)
def test_eap_equals_per_edge_gate_oracle(arch, granularity):
    """W from one batched forward+backward equals -dL/dgate of an independent gated re-implementation."""
    model = tiny_model(arch)
    samples = tiny_samples(2, 3)  # different lengths: the batch is padded
    result = attribute(model, samples, granularity=granularity, batch_size=3)
    assert result.scores.dtype == np.float64
    for k, sample in enumerate(samples):
        expected, _ = oracle_scores(naive_gated_forward, model, [sample], granularity)
        assert_close(result.scores[k], expected.numpy())
    # structural zeros stay zero, real edges are not
    assert np.all(result.scores[:, ~result.edge_mask] == 0)
    assert np.count_nonzero(result.scores[:, result.edge_mask]) > 0.9 * result.edge_mask.sum() * len(samples)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_eap_equals_gated_composition_of_the_models_own_modules(arch):
    """Block level for every adapter, Gemma's post-norms and soft-capping included."""
    model = tiny_model(arch)
    for sample in tiny_samples(3, 2):
        expected, logits = oracle_scores(composed_gated_forward, model, adapter_for(model), [sample])
        ids = torch.tensor([sample["prompt_ids"] + sample["answer_ids"][: sample["cut_len"]]])
        plain = model(ids).logits.detach().numpy()
        np.testing.assert_allclose(logits.numpy(), plain, rtol=0, atol=float64_rtol(model) * np.abs(plain).max())
        assert_close(attribute(model, [sample]).scores[0], expected.numpy())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sum_rule(arch):
    """sum_u W[d, u] = -<dL/dx_d, x_d>, with dL/dx_d from an added zero tensor on d's input.

    An RMSNorm is scale invariant, so its input gradient is almost orthogonal to its input
    and the sum nearly cancels: the error is measured against sum_u |W[d, u]|.
    """
    model = tiny_model(arch)
    sample = tiny_samples(4, 1)[0]
    result = attribute(model, [sample])
    assert np.abs(result.scores).sum() > 1e-4
    for d, name in enumerate(result.dst_names):
        grad, x = gradient_at_input(model, sample, name)
        expected = -(grad * x).sum().item()
        row = result.scores[0, d]
        assert np.abs(row).sum() > 0
        assert abs(row.sum() - expected) <= 1e-10 * np.abs(row).sum(), (name, row.sum(), expected)


@pytest.mark.parametrize(
    "granularity,edges",
    [
        ("block", [("attn.1", "embed"), ("mlp.2", "attn.2"), ("logits", "mlp.0"), ("attn.2", "mlp.1")]),
        ("qkv", [("attn.1.q", "embed"), ("attn.2.k", "attn.0"), ("attn.1.v", "mlp.0")]),
        ("head", [("attn.1.h2.q", "attn.0.h1"), ("attn.2.kv1.k", "embed"), ("attn.2.kv0.v", "attn.1.h3"), ("mlp.1", "attn.1.h0")]),
    ],
)
def test_first_order_finite_difference(granularity, edges):
    """Removing eps of an edge changes the loss by eps * W[d, u] (central difference, eps = 1e-4)."""
    model = tiny_model("qwen2")
    samples = tiny_samples(5, 2)
    result = attribute(model, samples, granularity=granularity, batch_size=2)
    graph = Graph(3, granularity, 4, 2)
    eps = 1e-4
    for dst, src in edges:
        W = result.scores[:, graph.dst_index[dst], graph.src_index[src]].sum()
        plus = loss_with_edge_removed(model, samples, dst, src, eps)
        minus = loss_with_edge_removed(model, samples, dst, src, -eps)
        slope = (plus - minus) / (2 * eps)
        assert abs(W) > 1e-6, (dst, src)
        assert abs(slope - W) < 1e-6 * max(abs(W), 1e-3), (dst, src, slope, W)


def test_hooks_change_nothing():
    """Logits inside the engine's hooks are bit-identical to the plain model's; its loss is the plain loss."""
    model = tiny_model("llama", exact=False)
    samples = tiny_samples(6, 3)
    engine = EdgeAttributor(model, "head")
    batch = make_batch(samples[:1], 0)
    ids = batch.input_ids
    plain = model(ids).logits
    with engine.hooked(batch):
        hooked = model(ids).logits
    assert torch.equal(plain, hooked)
    _, loss = EdgeAttributor(model, "block").scores(make_batch(samples, 0))
    expected = [plain_loss(model, [s]).item() for s in samples]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12)


def test_batch_invariance_and_padding():
    model = tiny_model("mistral")
    samples = tiny_samples(7, 4)
    together = attribute(model, samples, granularity="qkv", batch_size=4).scores
    for k, sample in enumerate(samples):
        alone = attribute(model, [sample], granularity="qkv").scores[0]
        assert_close(together[k], alone, rtol=1e-10)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_qkv_and_head_sum_to_block(arch):
    model = tiny_model(arch)
    samples = tiny_samples(8, 2)
    block = attribute(model, samples, granularity="block", batch_size=2)
    qkv = attribute(model, samples, granularity="qkv", batch_size=2)
    head = attribute(model, samples, granularity="head", batch_size=2)
    n_layers, H, KV = 3, 4, 2
    heads = Graph(n_layers, "head", H, KV)
    blocks = Graph(n_layers, "block")

    def block_of(name):
        kind, layer, _ = __import__("circuitdiff.graph", fromlist=["parse_node"]).parse_node(name)
        return "embed" if kind == "embed" else "logits" if kind == "logits" else f"{kind}.{layer}"

    # qkv: the three destinations of an attention block sum to the block destination
    collapsed = np.zeros_like(block.scores)
    for d, name in enumerate(qkv.dst_names):
        collapsed[:, blocks.dst_index[block_of(name)]] += qkv.scores[:, d]
    assert_close(collapsed, block.scores, rtol=1e-10)
    # head: heads sum over sources, q heads + k/v groups over destinations
    collapsed = np.zeros_like(block.scores)
    for d, dname in enumerate(heads.dst_names):
        for u, uname in enumerate(heads.src_names):
            collapsed[:, blocks.dst_index[block_of(dname)], blocks.src_index[block_of(uname)]] += head.scores[:, d, u]
    assert_close(collapsed, block.scores, rtol=1e-10)


def test_gradient_checkpointing_gives_the_same_scores():
    model = tiny_model("qwen2")
    samples = tiny_samples(9, 3)
    for granularity in ("block", "head"):
        plain = attribute(model, samples, granularity=granularity, batch_size=3).scores
        ckpt = attribute(model, samples, granularity=granularity, batch_size=3, gradient_checkpointing=True).scores
        assert_close(ckpt, plain, rtol=1e-12)


def test_stock_norms_float32_internals():
    """With the stock HF norms (float32 inside) the engine still matches the model's own gated composition."""
    model = tiny_model("llama", exact=False)
    sample = tiny_samples(10, 1)[0]
    expected, _ = oracle_scores(composed_gated_forward, model, adapter_for(model), [sample])
    assert_close(attribute(model, [sample]).scores[0], expected.numpy(), rtol=1e-10)
    qkv = attribute(model, [sample], granularity="qkv").scores[0]
    block = attribute(model, [sample]).scores[0]
    g = Graph(3, "qkv")
    collapsed = block.copy()
    for l in range(3):
        rows = [g.dst_index[f"attn.{l}.{p}"] for p in "qkv"]
        collapsed[Graph(3).dst_index[f"attn.{l}"]] = qkv[rows].sum(0)
    # the norm's float32 backward, taken per piece, rounds differently from the whole: ~1e-7 of the scale
    assert_close(collapsed, block, rtol=1e-5)


def test_bfloat16_accumulates_in_float32():
    model32 = tiny_model("llama", dtype=torch.float32, exact=False, seed=11)
    model16 = tiny_model("llama", dtype=torch.bfloat16, exact=False, seed=11)
    samples = tiny_samples(11, 2)
    w32 = attribute(model32, samples, batch_size=2)
    w16 = attribute(model16, samples, batch_size=2)
    assert w16.scores.dtype == np.float32 and w16.meta["score_dtype"] == "float32"
    a, b = w32.scores[:, w32.edge_mask], w16.scores[:, w16.edge_mask]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_model_state_is_restored():
    model = tiny_model("llama")
    model.train()
    attribute(model, tiny_samples(12, 1), granularity="qkv")
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.layers[0].input_layernorm._forward_pre_hooks


def test_unsupported_architecture_is_one_clear_line():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20))
    with pytest.raises(UserError) as err:
        attribute(model, tiny_samples(0, 1, vocab=20))
    message = str(err.value)
    assert "'gpt2' is not supported" in message and "ADAPTERS" in message and "\n" not in message


def test_head_granularity_refused_where_heads_do_not_add_up():
    with pytest.raises(UserError, match="mixes the heads"):
        attribute(tiny_model("gemma2"), tiny_samples(0, 1), granularity="head")
    # an o_proj bias belongs to no head: with it, head rows would not sum to block rows
    import transformers
    from tiny import COMMON

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    with pytest.raises(UserError, match="o_proj without bias"):
        attribute(model, tiny_samples(0, 1), granularity="head")
    attribute(model, tiny_samples(0, 1), granularity="qkv")  # the other granularities are fine


@pytest.mark.parametrize("bad,message", [
    ({"prompt_ids": [], "answer_ids": [1], "cut_len": 1}, "prompt_ids"),
    ({"prompt_ids": [1], "answer_ids": [1, 2], "cut_len": 3}, "cut_len=3"),
    ({"prompt_ids": [1], "answer_ids": [1, 2]}, "missing 'cut_len'"),
])
def test_bad_samples(bad, message):
    with pytest.raises(UserError, match=message):
        attribute(tiny_model("llama"), [bad])


def test_logit_objective_is_linear_in_the_final_norm():
    """Doubling the final norm's weight doubles the logits, so minus the centred logit and every W of the
    logit objective double exactly (a power of two commutes with rounding); the NLL, which saturates, does not."""
    model = tiny_model("llama")
    samples = tiny_samples(9, 2)
    doubled = tiny_model("llama")
    with torch.no_grad():
        doubled.model.norm.weight.mul_(2.0)
    W1 = attribute(model, samples, objective="logit")
    W2 = attribute(doubled, samples, objective="logit")
    assert np.abs(W1.scores).max() > 1e-6
    np.testing.assert_array_equal(W2.scores, 2.0 * W1.scores)
    np.testing.assert_array_equal(W2.loss, 2.0 * W1.loss)
    # the value is minus the centred logit of the answer tokens, from the plain model's logits
    for k, s in enumerate(samples):
        ids = torch.tensor([s["prompt_ids"] + s["answer_ids"][: s["cut_len"]]])
        logits = model(ids).logits[0, len(s["prompt_ids"]) - 1 : len(s["prompt_ids"]) - 1 + s["cut_len"]]
        targets = torch.tensor(s["answer_ids"][: s["cut_len"]])
        centred = logits[torch.arange(s["cut_len"]), targets] - logits.mean(-1)
        assert W1.loss[k] == pytest.approx(-centred.mean().item(), rel=1e-12)
    N1 = attribute(model, samples, objective="nll").scores
    N2 = attribute(doubled, samples, objective="nll").scores
    assert not np.allclose(N2, 2.0 * N1, rtol=1e-3)
    with pytest.raises(UserError, match="objective 'ce' is unknown"):
        attribute(model, samples, objective="ce")


def test_logit_objective_equals_the_gated_oracle():
    """The logit objective's W is -dL/dgate of the independent gated re-implementation with that objective."""
    model = tiny_model("qwen2")
    samples = tiny_samples(10, 2)
    result = attribute(model, samples, granularity="qkv", objective="logit", batch_size=2)
    for k, sample in enumerate(samples):
        _, gates, logits = naive_gated_forward(model, [sample], "qkv")
        p, cut = len(sample["prompt_ids"]), sample["cut_len"]
        picked = logits[0, p - 1 : p - 1 + cut]
        target = torch.tensor(sample["answer_ids"][:cut])
        loss = -(picked[torch.arange(cut), target] - picked.mean(-1)).mean()
        (grad,) = torch.autograd.grad(loss, gates.values)
        assert_close(result.scores[k], -grad.numpy())
