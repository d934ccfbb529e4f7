"""Edge interventions (`circuitdiff intervene`) on tiny float64 models, against independent computations.

Scaling edge u->d by c (d receives x_d - (1-c)*O_u, O_u from the same forward) is exactly the
gated oracle of tests/oracle.py with that edge's gate set to c: the oracle builds every
destination input as sum_u gate[d,u] * O_u with O_u computed in the same (gated) pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_validate import _tiny_run, composed, gated_loss, naive
from tiny import float64_rtol, tiny_model, tiny_samples

import oracle
from circuitdiff.attribute import attribute
from circuitdiff.cli import main
from circuitdiff.errors import UserError
from circuitdiff.engine import EdgeEditor, exact_edge_effects, generate_with_edits, losses_with_edits
from circuitdiff.graph import Edge, all_edges
from circuitdiff.intervene import intervene, matched_draws, paired_effects, random_draws, top_edges
from circuitdiff.stages.intervene import choose_targeted

EOS = 0  # tiny_samples draws ids from 1..60; a generated 0 ends an answer


def test_factor_one_changes_nothing():
    model = tiny_model("llama", exact=False)
    editor = EdgeEditor(model, "qkv")
    edits = [(e, 0.0) for e in all_edges(editor.graph)[::5]]  # factor 1 -> coefficient 1 - 1 = 0
    ids = torch.tensor([tiny_samples(21, 1)[0]["prompt_ids"]])
    plain = model(ids).logits
    with editor.edits(edits):
        hooked = model(ids).logits
    assert torch.equal(plain, hooked)
    prompts = [s["prompt_ids"] for s in tiny_samples(22, 3)]
    same = generate_with_edits(model, editor, prompts, edits, eos_ids=[EOS], max_new_tokens=6)
    none = generate_with_edits(model, editor, prompts, [], eos_ids=[EOS], max_new_tokens=6)
    assert [g.answer_ids for g in same] == [g.answer_ids for g in none]
    assert all(len(g.answer_ids) > 0 for g in none)


def test_factor_zero_on_one_edge_equals_the_exact_ablation():
    model = tiny_model("qwen2")
    samples = tiny_samples(23, 3)
    editor = EdgeEditor(model, "block")
    for edge in (Edge("embed", "attn.1"), Edge("attn.2", "mlp.2"), Edge("mlp.0", "logits")):
        dL, clean = exact_edge_effects(model, samples, [edge], batch_size=2)
        loss = losses_with_edits(model, editor, samples, [(edge, 1.0)], batch_size=3)  # padded batch of 3
        np.testing.assert_allclose(loss, clean + dL[:, 0], rtol=float64_rtol(model), atol=0)
        assert np.abs(dL).max() > 1e-4


@pytest.mark.parametrize("arch,granularity,factor", [("llama", "head", 0.3), ("qwen3", "qkv", 2.0),
                                                    ("gemma2", "block", 0.3)])
def test_several_scaled_edges_equal_the_gated_oracle(arch, granularity, factor):
    """Chained edges (an edited source feeding another edited edge) use the source's edited output; factor 2
    amplifies (the base-model test of grown edges)."""
    model = tiny_model(arch)
    editor = EdgeEditor(model, granularity)
    edges = all_edges(editor.graph)
    chosen = [edges[0], edges[len(edges) // 3], edges[len(edges) // 2], edges[-2]]
    samples = tiny_samples(24, 2)
    loss = losses_with_edits(model, editor, samples, [(e, 1 - factor) for e in chosen])
    gates = {(e.dst, e.src): factor for e in chosen}
    for k, sample in enumerate(samples):
        expected = composed(model, sample, gates) if arch.startswith("gemma") else naive(model, sample, gates, granularity)
        plain = composed(model, sample, {}) if arch.startswith("gemma") else naive(model, sample, {}, granularity)
        tol = float64_rtol(model) * abs(expected)
        assert abs(loss[k] - expected) <= tol, (loss[k], expected)
        assert abs(expected - plain) > 100 * tol


def _oracle_greedy(model, prompt, gates, max_new_tokens, granularity="block"):
    """Greedy decoding without a cache: the whole sequence through the gated oracle at every step.

    Stops at EOS (the caller clears the model's generation_config EOS ids).
    """
    stop = {EOS}

    with oracle.preset_gates(gates):
        seq, out = list(prompt), []
        for _ in range(max_new_tokens):
            sample = {"prompt_ids": seq, "answer_ids": [1], "cut_len": 1}
            _, _, logits = oracle.naive_gated_forward(model, [sample], granularity)
            token = int(logits[0, len(seq) - 1].argmax())
            if token in stop:
                break
            out.append(token)
            seq.append(token)
        return out


def test_generation_with_cache_equals_no_cache_recomputation():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None  # only EOS ends an answer
    editor = EdgeEditor(model, "block")
    edges = all_edges(editor.graph)
    chosen = [edges[0], edges[14], edges[-1]]  # embed->attn.0, mlp.1->attn.2, mlp.2->logits
    prompts = [s["prompt_ids"] for s in tiny_samples(25, 3)]  # different lengths: left padding in the batch
    gens = generate_with_edits(model, editor, prompts, [(e, 1.0) for e in chosen], eos_ids=[EOS], max_new_tokens=7)
    plain = generate_with_edits(model, editor, prompts, [], eos_ids=[EOS], max_new_tokens=7)
    for prompt, gen in zip(prompts, gens):
        assert gen.answer_ids == _oracle_greedy(model, prompt, {(e.dst, e.src): 0.0 for e in chosen}, 7)
    assert [g.answer_ids for g in gens] != [g.answer_ids for g in plain], "the intervention changes no token: vacuous"


def test_intervene_effects_and_paired_bootstrap():
    model = tiny_model("llama")
    samples = tiny_samples(26, 6)
    questions = [{"prompt_ids": s["prompt_ids"], "gold": str(s["answer_ids"][0]), "kind": "numeric"} for s in samples]
    targeted = ["embed->attn.1", "attn.0->mlp.0"]
    result = intervene(model, targeted, factor=0.0, loss_samples=samples, questions=questions, random=3, seed=1,
                       eos_ids=[EOS], decode=lambda ids: " ".join(map(str, ids)), max_new_tokens=3, n_boot=500)
    loss = result.effects["loss"]
    none, tgt = np.array(result.loss["none"]), np.array(result.loss["targeted"])
    assert loss["targeted_minus_none"]["mean"] == pytest.approx(float((tgt - none).mean()))
    rnd = np.array(result.loss["random"]).mean(0)
    assert loss["targeted_minus_random"]["mean"] == pytest.approx(float((tgt - rnd).mean()))
    lo, hi = loss["targeted_minus_none"]["ci"]
    assert lo <= loss["targeted_minus_none"]["mean"] <= hi and lo < hi
    assert len(result.random) == 3 and all(len(d) == 2 and not set(d) & set(result.targeted) for d in result.random)
    acc = result.effects["accuracy"]
    assert set(np.unique(result.correct["none"])) <= {0.0, 1.0} and acc["n"] == 6
    # the unmodified loss is the engine's loss
    np.testing.assert_allclose(none, attribute(model, samples).loss, rtol=1e-12)


def test_paired_bootstrap_by_hand():
    none = np.array([1.0, 2.0, 3.0, 4.0])
    values = {"none": none, "targeted": none + 1.0, "random": np.stack([none, none + 0.5])}
    out = paired_effects(values, n_boot=200)
    # constant paired differences: every resample gives the same mean, so the CI is a point
    assert out["targeted_minus_none"] == {"mean": 1.0, "ci": [1.0, 1.0]}
    assert out["random_minus_none"]["mean"] == pytest.approx(0.25)
    assert out["targeted_minus_random"]["ci"] == pytest.approx([0.75, 0.75])
    assert out["random_draw_effects"] == [0.0, 0.5]


def test_bad_input_is_a_user_error():
    model = tiny_model("llama")
    graph = EdgeEditor(model, "block").graph
    edges = all_edges(graph)
    with pytest.raises(UserError, match="unknown source"):
        intervene(model, ["attn.9->logits"], loss_samples=tiny_samples(1, 1))
    with pytest.raises(UserError, match="number of real edges"):
        top_edges(np.ones(len(edges)), edges, len(edges) + 1)
    with pytest.raises(UserError, match="random control"):
        random_draws(edges, edges[:3], len(edges) - 2, 1)


def _grown_run(tmp_path):
    """A tiny run dir whose tuned W file is the base's with attn.0 -> mlp.1 grown by 100 (model, run, base W, graph)."""
    from circuitdiff.store import layout

    model, run, rows = _tiny_run(tmp_path)
    samples = [{"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"], "cut_len": 2} for r in rows[:3]]
    base = attribute(model, samples)
    tuned = attribute(model, samples)
    tuned.scores = tuned.scores.copy()
    g = EdgeEditor(model, "block").graph
    tuned.scores[:, g.dst_index["mlp.1"], g.src_index["attn.0"]] += 100.0  # this edge grows most
    base.save(layout.attribution(run, "base", "gsm8k", 0.1))
    tuned.save(layout.attribution(run, "tuned", "gsm8k", 0.1))
    return model, run, base, g


def test_top_and_top_grown_from_run_files(tmp_path):
    model, run, base, g = _grown_run(tmp_path)
    graph_of = lambda gran: EdgeEditor(model, gran).graph  # noqa: E731
    grown, how, gran = choose_targeted(run, "tuned", "gsm8k", 0.1, "top-grown", 1, graph_of)
    assert grown == [Edge("attn.0", "mlp.1")] and "mean|W_tuned| - mean|W_base|" in how and gran == "block"
    top, _, _ = choose_targeted(run, "base", "gsm8k", 0.1, "top", 3, graph_of)
    mean_abs = np.abs(base.scores).mean(0)
    expected = sorted(((mean_abs[g.dst_index[e.dst], g.src_index[e.src]], e) for e in all_edges(g)), key=lambda t: -t[0])[:3]
    assert top == [e for _, e in expected]
    with pytest.raises(UserError, match="number of real edges"):
        choose_targeted(run, "tuned", "gsm8k", 0.1, "top", 999, graph_of)
    with pytest.raises(UserError, match="does not exist"):
        choose_targeted(run, "tuned", "gsm8k", 0.3, "top", 3, graph_of)


def test_cli_loss_only_writes_json(tmp_path, capsys):
    from circuitdiff.store import layout

    model, run, rows = _tiny_run(tmp_path)
    attribute(model, [{"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"], "cut_len": 2} for r in rows]).save(
        layout.attribution(run, "tuned", "gsm8k", 0.1))
    capsys.readouterr()
    code = main(["intervene", "--run", str(run), "--dataset", "gsm8k", "--alpha", "0.1", "--edges", "top", "--k", "2",
                 "--n-random", "2", "--no-accuracy"])
    assert code == 0
    out = capsys.readouterr().out
    assert "targeted - random" in out and "paired-bootstrap" in out
    data = json.loads(layout.intervention(run, "tuned", "gsm8k", 0.1, "top_k=2_factor=0.0").read_text())
    assert len(data["targeted_edges"]) == 2 and len(data["random_edges"]) == 2
    assert len(data["per_question"]["loss"]["none"]) == 4 and data["per_question"]["correct"] is None
    assert data["meta"]["T_cut"] == 2 and "x_d - (1-c)*O_u" in data["conventions"]["intervention"]
    cases = [
        (["--edges", "attn.0->attn.0"], "does not exist"),
        (["--edges", "top", "--k", "500"], "number of real edges"),
        (["--alpha", "0.5"], "does not exist"),
    ]
    for extra, needle in cases:
        argv = ["intervene", "--run", str(run), "--dataset", "gsm8k", "--alpha", "0.1", "--no-accuracy"]
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar, if any
        assert err.startswith("circuitdiff: error:") and needle in err, err


def test_report_section_shows_validation_and_intervention(tmp_path, capsys):
    from types import SimpleNamespace

    from circuitdiff.store import layout
    from circuitdiff.report import Settings, build_report
    from circuitdiff.report.validation import validation_section

    model, run, rows = _tiny_run(tmp_path)
    assert validation_section(SimpleNamespace(run_dir=run)) == []  # no result files: no section
    samples = [{"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"], "cut_len": 2} for r in rows[:3]]
    for role in ("base", "tuned"):
        attribute(model, samples).save(layout.attribution(run, role, "gsm8k", 0.1))
    common = ["--run", str(run), "--dataset", "gsm8k", "--alpha", "0.1"]
    assert main(["validate", *common, "--batch-size", "8"]) == 0
    assert main(["intervene", *common, "--edges", "top-grown", "--k", "2", "--n-random", "2", "--no-accuracy"]) == 0
    validation = json.loads(layout.validation(run, "tuned", "gsm8k", 0.1).read_text())
    out = build_report(run, Settings(n_boot=100, n_perm=100))
    page = (out / "report.html").read_text()
    assert "EAP vs exact edge ablation" in page and "Edge interventions" in page
    assert f"{validation['summary']['spearman']:.3f}"[:4] in page
    assert (out / "fig_validation_nll_tuned_gsm8k_alpha=0.1.png").read_bytes()[:4] == b"\x89PNG"
    layout.intervention(run, "tuned", "gsm8k", 0.1, "broken").write_text("{")
    sections = validation_section(SimpleNamespace(run_dir=run))
    assert "broken.json" in sections[1].text and len(sections[1].blocks[0].rows) == 1


def _band(name: str, n_layers: int, bands: int) -> int:
    """The layer band of a destination name, computed from the name alone."""
    layer = n_layers if name == "logits" else int(name.split(".")[1])
    return min(bands - 1, layer * bands // (n_layers + 1))


def test_matched_control_partners_by_band_and_magnitude():
    """Every partner: same destination band, not targeted, not repeated, and fewer than `caliper` eligible
    same-band edges are closer to the target in |log mean|W|| (brute force); closer than uniform draws."""
    graph = EdgeEditor(tiny_model("llama"), "qkv").graph
    edges = all_edges(graph)
    values = np.random.default_rng(3).lognormal(0.0, 2.0, len(edges))
    targeted = [edges[i] for i in np.random.default_rng(4).choice(len(edges), 6, replace=False)]
    value = dict(zip(edges, values))
    bands, caliper = 3, 4
    draws = matched_draws(targeted, edges, values, graph.n_layers, 20, seed=5, bands=bands, caliper=caliper)
    assert draws == matched_draws(targeted, edges, values, graph.n_layers, 20, seed=5, bands=bands, caliper=caliper)
    for draw in draws:
        assert len(set(draw)) == len(draw) and not set(draw) & set(targeted)
        for j, (t, p) in enumerate(zip(targeted, draw)):
            assert _band(p.dst, graph.n_layers, bands) == _band(t.dst, graph.n_layers, bands)
            eligible = [e for e in edges if e not in targeted and e not in draw[:j]
                        and _band(e.dst, graph.n_layers, bands) == _band(t.dst, graph.n_layers, bands)]
            gap = abs(np.log(value[p]) - np.log(value[t]))
            assert sum(abs(np.log(value[e]) - np.log(value[t])) < gap for e in eligible) < caliper
    uniform = random_draws(edges, targeted, len(targeted), 20, seed=5)
    gap = lambda ds: np.mean([abs(np.log(value[p] / value[t])) for d in ds for t, p in zip(targeted, d)])  # noqa: E731
    assert gap(draws) < gap(uniform)  # the rank check above is the guarantee; this says it helps on average
    # a band that runs out lends from the nearest band; nothing left anywhere is an error
    one_band = [e for e in edges if _band(e.dst, graph.n_layers, bands) == 0]
    spill = matched_draws(one_band, edges, values, graph.n_layers, 1, bands=bands)[0]
    assert all(_band(p.dst, graph.n_layers, bands) == 1 for p in spill)
    with pytest.raises(UserError, match="no untargeted edge left"):
        matched_draws(edges[:-1], edges, values, graph.n_layers, 1, bands=1)


def test_amplify_grown_edges_in_the_base_with_matched_control(tmp_path, capsys):
    """--role base --edges top-grown --factor 2: the grown edges (read from both W files) amplified in the base;
    the control is matched on the base's W and recorded; --control uniform gives random_draws' sets."""
    from circuitdiff.store import layout

    model, run, base, g = _grown_run(tmp_path)
    common = ["intervene", "--run", str(run), "--dataset", "gsm8k", "--alpha", "0.1", "--role", "base", "--edges",
              "top-grown", "--k", "1", "--factor", "2", "--n-random", "3", "--no-accuracy"]
    assert main(common) == 0
    data = json.loads(layout.intervention(run, "base", "gsm8k", 0.1, "top-grown_k=1_factor=2.0").read_text())
    assert data["targeted_edges"] == ["attn.0->mlp.1"] and data["factor"] == 2.0 and data["meta"]["role"] == "base"
    assert data["meta"]["control"].startswith("each draw gives every targeted edge a partner")
    values = np.abs(base.scores).mean(0)
    draws = matched_draws([Edge("attn.0", "mlp.1")], all_edges(g), values[tuple(zip(*[(g.dst_index[e.dst], g.src_index[e.src]) for e in all_edges(g)]))],
                          g.n_layers, 3, seed=0)
    assert data["random_edges"] == [[e.name for e in d] for d in draws]
    assert data["meta"]["control_match"]["max_abs_log_ratio"] >= 0
    assert main(common + ["--control", "uniform", "--out", str(tmp_path / "uniform")]) == 0
    uniform = json.loads((tmp_path / "uniform" / "top-grown_k=1_factor=2.0.json").read_text())
    expected = random_draws(all_edges(g), [Edge("attn.0", "mlp.1")], 1, 3, 0)
    assert uniform["random_edges"] == [[e.name for e in d] for d in expected]
