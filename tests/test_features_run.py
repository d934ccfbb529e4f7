"""Feature-level diffing on tiny models: edits that change nothing, attribution against finite differences,
lockstep generation against a recomputation, the whole command with resume, stream mode and bad input."""

import json
import sys

import numpy as np
import pytest
import torch

from circuitdiff.cli import main as cli_main
from circuitdiff.errors import UserError
from circuitdiff.features import FeatureSettings, features
from circuitdiff.features.activations import Plan, chunks_of
from circuitdiff.features.attribution import attribute_latents
from circuitdiff.features.crosscoder import Crosscoder
from circuitdiff.features.interventions import LatentEdit
from circuitdiff.features.lockstep import capture, lockstep
from circuitdiff.report.features import feature_sections
from circuitdiff.store import layout
from features_helpers import tiny_pair, write_run
from pipeline_helpers import save_tiny_lm, tiny_lm
from tiny import exact_norms

LAYER = 0
TINY = dict(tokens=3000, dict_size=4, k=4, ctx_len=64, text=("run", "gsm8k"), shard_tokens=400, epochs=2,
            batch_size=64, top_k=8, n_questions=4, n_random=2, factors=(2.0,), max_new_tokens=6, n_boot=200)


@pytest.fixture(scope="module")
def models():
    """(base, tuned) float64 tiny Llamas with float64 norms: the tuned one is the base with layer 0's MLP moved."""
    base = exact_norms(tiny_lm(seed=0).double())
    tuned = exact_norms(tiny_lm(seed=0).double())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.model.layers[0].mlp.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return base, tuned


def random_crosscoder(d: int = 32, n_latents: int = 64, seed: int = 0) -> Crosscoder:
    cc = Crosscoder(2, d, n_latents, seed=seed)
    with torch.no_grad():
        cc.W_enc.mul_(10.0)
        cc.b_enc.fill_(-0.5)
        cc.theta.fill_(0.0)
    return cc.double()


def ids(seed=0, batch=3, width=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 258, (batch, width), generator=g)


def test_empty_or_unit_edits_leave_logits_unchanged(models):
    base, tuned = models
    cc = random_crosscoder()
    x = ids()
    clean = tuned(input_ids=x).logits
    for edit in (LatentEdit(cc, 1, 1, [], 0.0), LatentEdit(cc, 1, 1, list(range(64)), 1.0)):
        assert edit.inert
        with lockstep(tuned, [base], LAYER, edit):  # the partner runs, the hook fires, h comes back as it was
            assert torch.equal(tuned(input_ids=x).logits, clean)
    with lockstep(tuned, [base], LAYER, LatentEdit(cc, 1, 1, list(range(10)), 0.0)):
        edited = tuned(input_ids=x).logits
    assert not torch.allclose(edited, clean)  # a real edit does change them
    assert torch.equal(tuned(input_ids=x).logits, clean)  # and leaves nothing behind


def test_edit_equals_the_crosscoder_formula(models):
    """Ablating latents S adds -f_S W_dec[S, tuned] / s_tuned to the residual, f from both models' residuals."""
    base, tuned = models
    cc = random_crosscoder(seed=1)
    x = ids(1)
    S = [3, 7, 11, 20]
    hb, ht = capture(base, LAYER, input_ids=x), capture(tuned, LAYER, input_ids=x)
    xs = np.stack([hb.numpy(), ht.numpy()], 2).reshape(-1, 2, 32) * cc.input_scale.numpy()[None, :, None]
    W_enc, W_dec = cc.W_enc.detach().numpy(), cc.W_dec.detach().numpy()
    pre = np.maximum(np.einsum("nmd,mdf->nf", xs, W_enc) + cc.b_enc.detach().numpy(), 0)
    f = pre * (pre * np.linalg.norm(W_dec, axis=-1).sum(-1) > 0)
    want = ht.numpy() - (f[:, S] @ W_dec[S, 1] / float(cc.input_scale[1])).reshape(ht.shape)
    seen = {}
    with lockstep(tuned, [base], LAYER, LatentEdit(cc, 1, 1, S, 0.0)):
        handle = tuned.model.layers[LAYER].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
        tuned(input_ids=x)
        handle.remove()
    assert np.abs(f[:, S]).sum() > 0
    np.testing.assert_allclose(seen["h"].detach().numpy(), want, rtol=1e-10, atol=1e-10)


def test_attribution_is_the_first_order_loss_change(models):
    """A_j = -sum f_j dL/df_j: scaling latent j by (1 - eps) changes the loss by eps * A_j to first order."""
    from circuitdiff.engine import answer_loss, make_batch
    from circuitdiff.models.adapters import adapter_for

    base, tuned = models
    cc = random_crosscoder(seed=2)
    sample = {"prompt_ids": ids(2, 1, 6)[0].tolist(), "answer_ids": ids(3, 1, 5)[0].tolist(), "cut_len": 5}
    A = attribute_latents(tuned, [base], cc, 1, LAYER, [sample])
    batch = make_batch([sample], 0)

    def loss(latents, factor):
        with lockstep(tuned, [base], LAYER, LatentEdit(cc, 1, 1, latents, factor)), torch.no_grad():
            hidden = tuned.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            return float(answer_loss(tuned, adapter_for(tuned), hidden, batch)[0])

    clean, eps = loss([], 1.0), 1e-6
    active = np.flatnonzero(np.abs(A) > 1e-4)
    assert len(active) >= 3
    for j in active[:5]:
        fd = (loss([int(j)], 1.0 - eps) - clean) / eps
        assert fd == pytest.approx(A[j], rel=1e-4, abs=1e-8)
    assert np.all(A[np.abs(A) <= 1e-12] == 0)


def test_lockstep_generation_equals_recomputation(models):
    """Greedy answers with an edit active and KV caches in both models equal a loop that recomputes everything."""
    from circuitdiff.engine import generate_with_edits
    from circuitdiff.features.interventions import _Editor

    base, tuned = models
    edit = LatentEdit(random_crosscoder(seed=3), 1, 1, list(range(0, 64, 3)), 3.0)
    prompts = [ids(4, 1, 5)[0].tolist(), ids(5, 1, 8)[0].tolist()]
    gens = generate_with_edits(tuned, _Editor(tuned, [base], LAYER, edit), prompts, None, eos_ids=[1], pad_id=0,
                               max_new_tokens=6, batch_size=2)
    for prompt, gen in zip(prompts, gens):
        seq = list(prompt)
        with lockstep(tuned, [base], LAYER, edit), torch.no_grad():
            for _ in range(6):
                nxt = int(tuned(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
                if nxt == 1:
                    break
                seq.append(nxt)
        assert gen.answer_ids == seq[len(prompt):]
    plain = generate_with_edits(tuned, _Editor(tuned, [base], LAYER, None), prompts, None, eos_ids=[1], pad_id=0,
                                max_new_tokens=6, batch_size=2)
    assert [g.answer_ids for g in plain] != [g.answer_ids for g in gens]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    base, tuned = tiny_pair(root / "models")
    return write_run(root / "run", base, tuned), base, tuned


def test_features_end_to_end_and_resume(tiny_run, tmp_path):
    run, base, tuned = tiny_run
    logs = []
    folder = features(run, settings=FeatureSettings(**TINY), out=tmp_path / "f", log=logs.append)
    F = 4 * 32
    latents = (folder / "latents.csv").read_text().splitlines()
    assert len(latents) == F + 1 and latents[0].startswith("latent,class,norm_class,norm_base,norm_tuned,relative_norm")
    summary = json.loads(layout.features_file(folder, "summary").read_text())
    assert summary["layer"] == 1 and summary["n_latents"] == F and set(summary["fvu"]) == {"base", "tuned"}
    assert sum(summary["counts"].values()) == F and summary["tokens"]["train"] + summary["tokens"]["held_out"] == 3000
    assert set(summary["null"]["null_model_only"]) == {"base-only", "null-only"}
    assert "spurious_model_only" in summary["null"] and summary["null"]["specs"]["null"] == str(base)
    for name in ("normalisation", "thresholds", "latent_scaling", "intervention", "null"):
        assert summary["conventions"][name]
    rows = (folder / "interventions.csv").read_text().splitlines()
    conditions = {line.split(",")[5] for line in rows[1:]}
    assert {"none", "targeted", "random", "random-0", "targeted-minus-random"} <= conditions
    assert {line.split(",")[0] for line in rows[1:]} == {"tuned", "base"}
    contexts = json.loads(layout.features_file(folder, "contexts").read_text())
    assert contexts["latents"] and all("[[" in t["context"] for c in contexts["latents"] for t in c["top"])
    sections = feature_sections(folder)
    assert sections and any(type(b).__name__ == "Figure" for b in sections[0].blocks)
    assert (folder / "features.html").read_text().count("<table") >= 4
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "timings.json"}
    logs.clear()
    features(run, settings=FeatureSettings(**TINY), out=tmp_path / "f", log=logs.append)
    assert any("trained, up to date" in line for line in logs)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "timings.json"}
    assert after == before  # a rerun recomputes nothing and rewrites the same bytes


def test_stream_mode_with_three_models(tiny_run, tmp_path):
    """--stream trains chunk by chunk and deletes each chunk once both crosscoders used it; a third model (sft)
    gets its own decoder, norms, shares and classes."""
    from features_helpers import save_perturbed

    run, base, _ = tiny_run
    sft = save_perturbed(base, tmp_path / "sft", seed=2, layers=(0, 1))
    s = FeatureSettings(**{**TINY, "stream": True, "epochs": 1, "chunk_tokens": 900, "attribution": False})
    folder = features(run, ["base", f"sft={sft}", "tuned"], s, out=tmp_path / "s", log=lambda _: None)
    summary = json.loads(layout.features_file(folder, "summary").read_text())
    assert [m["label"] for m in summary["models"]] == ["base", "sft", "tuned"] and set(summary["fvu"]) == {"base", "sft", "tuned"}
    assert set(summary["model_only"]) == {"base-only", "sft-only", "tuned-only"}
    header = (folder / "latents.csv").read_text().splitlines()[0].split(",")
    assert {"norm_sft", "nrn_sft", "share_sft", "beta_eps_sft"} <= set(header)
    plan = Plan.load(layout.features_file(folder, "tokens"))
    chunks = chunks_of(plan, 900)
    assert len(chunks) >= 2 and all(sum(plan.n_rows(x) for x in c) >= 900 for c in chunks[:-1])
    assert summary["training"]["steps"] == sum(sum(plan.n_rows(x) for x in c) // 64 for c in chunks)
    for label in ("base", "sft", "tuned"):  # the training chunks were deleted once used; the held-out shard stays
        left = sorted(p.name for p in layout.features_acts(folder, label).glob("shard-*.npy"))
        assert left == [layout.features_shard(folder, label, i).name for i in plan.held_shards()]


def test_bad_input_is_one_clear_line(tiny_run, tmp_path, capsys):
    run, base, tuned = tiny_run
    with pytest.raises(UserError, match="--layer 7 is out of range.*2 decoder layers"):
        features(run, settings=FeatureSettings(**{**TINY, "layer": 7}), out=tmp_path / "a")
    with pytest.raises(UserError, match="fewer than 10 batches"):
        features(run, settings=FeatureSettings(**{**TINY, "tokens": 500}), out=tmp_path / "b")
    with pytest.raises(UserError, match="hold only"):
        features(run, settings=FeatureSettings(**{**TINY, "tokens": 10**7, "text": ("run",)}), out=tmp_path / "c")
    other = save_tiny_lm(tmp_path / "other", seed=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="tokenizers of base and other differ"):
        features(run, ["base", f"other={other}"], FeatureSettings(**TINY), out=tmp_path / "d")
    capsys.readouterr()
    code = cli_main(["features", str(run), "--layer", "9", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("circuitdiff: error: --layer 9 is out of range")
    assert not (tmp_path / "e" / "tokens.npz").exists()


def test_help_is_fast_and_torch_free():
    import subprocess

    code = "import sys; from circuitdiff.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
