"""Exact edge ablation (`circuitdiff validate`) against independent computations on tiny float64 models.

The reference for "edge removed" is the gated re-implementation of tests/oracle.py with the
gate of that one edge set to 0 (1 - eps for a small ablation): it rebuilds every destination's
input as the explicit sum of the source outputs and shares no code with the hooks under test.
"""

from __future__ import annotations

import json

import numpy as np
import oracle
import pytest
import torch
from tiny import float64_rtol, tiny_model, tiny_samples

from circuitdiff.attribute import attribute
from circuitdiff.cli import main
from circuitdiff.errors import UserError
from circuitdiff.store import layout
from circuitdiff.engine import EdgeEditor, exact_edge_effects
from circuitdiff.graph import Edge, all_edges, parse_edge
from circuitdiff.validate import Validation, agreement, topk_overlap, validate


def gated_loss(forward, model, sample, gates: dict) -> float:
    """Loss of forward(model, [sample]) (an oracle) with gates[(dst, src)] = value, every other gate 1."""
    with oracle.preset_gates(gates):
        return float(forward(model, [sample])[0].detach())


def naive(model, sample, gates, granularity="block"):
    return gated_loss(lambda m, s: oracle.naive_gated_forward(m, s, granularity), model, sample, gates)


def composed(model, sample, gates):
    from circuitdiff.models.adapters import adapter_for

    return gated_loss(lambda m, s: oracle.composed_gated_forward(m, adapter_for(m), s), model, sample, gates)


def spread(edges, n):
    """n edges spread over the list, always with the first (embed) and the last (-> logits)."""
    picks = sorted(set(np.linspace(0, len(edges) - 1, n).round().astype(int).tolist()))
    return [edges[i] for i in picks]


@pytest.mark.parametrize("arch,granularity", [("llama", "block"), ("qwen3", "qkv"), ("mistral", "head"), ("gemma2", "block")])
def test_exact_ablation_equals_gated_oracle(arch, granularity):
    model = tiny_model(arch)
    samples = tiny_samples(11, 2)
    graph = EdgeEditor(model, granularity).graph
    edges = spread(all_edges(graph), 7)
    dL, clean = exact_edge_effects(model, samples, edges, granularity=granularity, batch_size=3)
    ref = composed if arch.startswith("gemma") else (lambda m, s, g: naive(m, s, g, granularity))
    rtol = float64_rtol(model)  # relative to the losses whose difference dL is
    for k, sample in enumerate(samples):
        base = ref(model, sample, {})
        assert abs(clean[k] - base) <= rtol * abs(base)
        for e, edge in enumerate(edges):
            removed = ref(model, sample, {(edge.dst, edge.src): 0.0})
            tol = rtol * max(abs(removed), abs(base))
            assert abs(dL[k, e] - (removed - base)) <= tol, (edge.name, dL[k, e], removed - base)
    assert np.abs(dL).max() > 1e-5, "every checked edge changes nothing: the check would be vacuous"


def test_batching_and_layer_replay_do_not_change_dL():
    """Batch size 2 (every edge alone, little replay) and 40 (all edges in one forward) agree."""
    model = tiny_model("qwen2")
    samples = tiny_samples(12, 2)
    edges = all_edges(EdgeEditor(model, "block").graph)
    small, clean = exact_edge_effects(model, samples, edges, batch_size=2)
    large, _ = exact_edge_effects(model, samples, edges, batch_size=40)
    # dL is a difference of two losses: its rounding is relative to the losses, not to dL
    np.testing.assert_allclose(small, large, rtol=0, atol=float64_rtol(model) * np.abs(clean).max())
    assert np.abs(small).max() > 1e-3


def test_small_ablation_converges_to_eap_for_every_block_edge():
    """(L(x_d - eps*O_u) - L(x_d + eps*O_u)) / (2 eps) -> W for every block edge; one-sided error shrinks with eps."""
    model = tiny_model("llama")
    samples = tiny_samples(13, 2)
    editor = EdgeEditor(model, "block")
    edges = all_edges(editor.graph)
    W = attribute(model, samples, batch_size=2).scores
    W = W[:, [editor.graph.dst_index[e.dst] for e in edges], [editor.graph.src_index[e.src] for e in edges]]
    eps = 1e-4
    plus, _ = exact_edge_effects(model, samples, edges, scale=eps, batch_size=30)
    minus, _ = exact_edge_effects(model, samples, edges, scale=-eps, batch_size=30)
    slope = (plus - minus) / (2 * eps)
    scale = np.abs(W).max()
    assert scale > 1e-3
    assert np.abs(slope - W).max() < 1e-6 * scale
    errors = []
    for e in (1e-2, 1e-3):
        one_sided, _ = exact_edge_effects(model, samples, edges, scale=e, batch_size=30)
        errors.append(np.abs(one_sided / e - W).max())
    assert errors[1] < 0.2 * errors[0], errors  # first order: the error falls ~10x per decade of eps


def test_validate_result_files_and_full_removal_correlation(tmp_path):
    model = tiny_model("qwen2")
    samples = tiny_samples(14, 2)
    result = validate(model, samples, batch_size=16)
    s = result.summary
    for key in ("spearman", "pearson", "spearman_pooled", "pearson_pooled"):
        assert np.isfinite(s[key]) and -1 <= s[key] <= 1, key
    assert 0 <= s["sign_agreement"] <= 1 and s["n_sign_edges"] > 0
    assert result.dL.shape == result.W.shape == (2, 28)
    # W is the engine's score of the same edges and samples
    full = attribute(model, samples).scores
    graph = EdgeEditor(model, "block").graph
    for e, edge in enumerate(result.edges):
        np.testing.assert_allclose(result.W[:, e], full[:, graph.dst_index[edge.dst], graph.src_index[edge.src]])
    json_path, png_path = result.save(tmp_path / "v.json")
    data = json.loads(json_path.read_text())
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["n_edges"] == 28 and len(data["edges"]) == 28 and data["figure"] == "v.png"
    assert data["edges"][0]["edge"] == "embed->attn.0"
    assert "zero ablation" in data["conventions"]["ablation"]
    again = Validation.load(json_path)
    np.testing.assert_array_equal(again.dL, result.dL)
    np.testing.assert_array_equal(again.W, result.W)
    assert again.edges == result.edges
    assert len(s["spearman_per_sample"]) == 2 and all(-1 <= v <= 1 for v in s["spearman_per_sample"])


def test_agreement_numbers_by_hand():
    W = np.array([3.0, -2.0, 1.0, 0.5, -0.1, 0.0])
    dL = np.array([2.5, -1.0, -0.8, 0.6, 1e-9, 0.2])
    out = agreement(W, dL, sign_threshold=1e-6)
    # |dL| > 1e-6 leaves 5 edges; signs agree on 3.0/2.5, -2/-1, 0.5/0.6 -> 3 of 5 (0 vs 0.2 disagrees)
    assert out["n_sign_edges"] == 5 and out["sign_agreement"] == pytest.approx(3 / 5)
    # W > 0 among them: 0, 2, 3 (agree, disagree, agree); W < 0: 1 (agrees); W = 0 (edge 5) in neither
    assert out["n_W_pos"] == 3 and out["sign_agreement_W_pos"] == pytest.approx(2 / 3)
    assert out["n_W_neg"] == 1 and out["sign_agreement_W_neg"] == 1.0
    assert out["fraction_dL_positive"] == pytest.approx(4 / 6)
    assert topk_overlap(W, dL, 3) == 1.0  # top-3 by |W| and by |dL|: {0, 1, 2}
    assert topk_overlap(W, dL, 5) == pytest.approx(4 / 5)  # {0,1,2,3,4} vs {0,1,2,3,5}
    assert out["top5pct_k"] == 1 and out["top5pct_overlap"] == 1.0
    # ranks W [6,1,5,4,2,3], dL [6,1,2,5,3,4]: sum d^2 = 12, rho = 1 - 6*12/(6*35)
    assert out["spearman"] == pytest.approx(1 - 72 / 210, abs=1e-12)


def test_unknown_edge_is_a_user_error():
    graph = EdgeEditor(tiny_model("llama"), "block").graph
    assert parse_edge("attn.0->mlp.0", graph) == Edge("attn.0", "mlp.0")
    for bad in ("attn.7->mlp.9", "mlp.2->attn.1", "embed", "embed->attn.0.q"):
        with pytest.raises(UserError) as err:
            parse_edge(bad, graph)
        assert "\n" not in str(err.value)


def _tiny_run(tmp_path, n_selected=2, T_cut=2):
    """A run directory by hand: manifest, generations and selection for a tiny saved model."""
    model = tiny_model("llama", dtype=torch.float32, exact=False)
    model.save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    rows = []
    for i, s in enumerate(tiny_samples(15, 4)):
        rows.append({"idx": i, "question": f"q{i}", "gold": "7", "kind": "numeric", "prompt_ids": s["prompt_ids"],
                     "answer_ids": s["answer_ids"] + [5, 6], "answer_text": "", "correct": True})
    for role in ("base", "tuned"):
        (run / "generations" / role).mkdir(parents=True)
        (run / "generations" / role / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "selection" / "gsm8k").mkdir(parents=True)
    (run / "selection" / "gsm8k" / "alpha=0.1.json").write_text(json.dumps({"idx": [2, 0, 3][:n_selected], "T_cut": T_cut}))
    spec = str(tmp_path / "model")
    (run / "manifest.json").write_text(json.dumps({"config": {"base": {"spec": spec}, "tuned": {"spec": spec}, "dtype": "float32"}}))
    return model, run, rows


def test_cli_run_dir_mode_reads_the_selection(tmp_path, capsys):
    model, run, rows = _tiny_run(tmp_path)
    code = main(["validate", "--run", str(run), "--role", "base", "--dataset", "gsm8k", "--alpha", "0.1",
                 "--n-samples", "4", "--batch-size", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Spearman" in out and "zero-ablation" in out and "granularity=block" in out
    data = json.loads(layout.validation(run, "base", "gsm8k", 0.1).read_text())
    assert layout.validation_figure(layout.validation(run, "base", "gsm8k", 0.1)).exists()
    assert data["meta"]["idx"] == [2, 0] and data["n_samples"] == 2 and data["n_edges"] == 28
    # the clean losses are those of the selected questions (idx 2 then 0), cut at T_cut = 2
    samples = [{"prompt_ids": rows[i]["prompt_ids"], "answer_ids": rows[i]["answer_ids"], "cut_len": 2} for i in (2, 0)]
    expected = attribute(model, samples).loss
    np.testing.assert_allclose(data["clean_loss"], expected, rtol=1e-5)

    # --method eap-ig: its own file beside EAP's, the same summary keys, W = the engine's EAP-IG, dL unchanged
    assert main(["validate", "--run", str(run), "--role", "base", "--dataset", "gsm8k", "--alpha", "0.1",
                 "--n-samples", "4", "--method", "eap-ig", "--ig-steps", "3"]) == 0
    assert "W (eap-ig3)" in capsys.readouterr().out
    ig = json.loads(layout.validation(run, "base", "gsm8k", 0.1, method="eap-ig3").read_text())
    assert ig["meta"]["method"] == "eap-ig3" and data["meta"]["method"] == "eap"
    assert set(ig["summary"]) == set(data["summary"])
    ig_result = Validation.load(layout.validation(run, "base", "gsm8k", 0.1, method="eap-ig3"))
    eap_result = Validation.load(layout.validation(run, "base", "gsm8k", 0.1))
    assert ig_result.edges == eap_result.edges
    np.testing.assert_allclose(ig_result.dL, eap_result.dL, rtol=1e-6)
    W_ig = attribute(model, samples, method="eap-ig", ig_steps=3).scores
    graph = EdgeEditor(model, "block").graph
    for k, e in enumerate(ig_result.edges):
        np.testing.assert_allclose(ig_result.W[:, k], W_ig[:, graph.dst_index[e.dst], graph.src_index[e.src]],
                                   rtol=1e-5, atol=1e-7)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    _, run, _ = _tiny_run(tmp_path, n_selected=0)
    capsys.readouterr()
    cases = [
        (["validate", "--run", str(run), "--dataset", "gsm8k", "--alpha", "0.3"], "does not exist"),
        (["validate", "--run", str(run), "--dataset", "gsm8k", "--alpha", "0.1"], "selected no samples"),
        (["validate", "--run", str(tmp_path / "nope"), "--dataset", "gsm8k", "--alpha", "0.1"], "does not exist"),
        (["validate", "--model", str(tmp_path / "model")], "give --model, --samples and --out"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("circuitdiff: error:") and needle in err and "\n" not in err, err
