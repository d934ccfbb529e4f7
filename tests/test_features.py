"""Feature-level diffing, the parts: BatchTopK, a planted dictionary, identical models, latent scaling against
least squares, resume, matched random sets, and edits that must change nothing (or exactly what first order says)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from circuitdiff.features.classes import classify, norm_class, null_comparison, scaling_beta
from circuitdiff.features.settings import Thresholds
from circuitdiff.features.crosscoder import Crosscoder, Pass, Trainer, batch_topk, evaluate, train
from circuitdiff.features.interventions import matched_random

TRAIN = dict(k=3, lr=1e-2, batch_size=128, aux_coef=1 / 32, dead_tokens=2000, log=lambda _: None)


def planted(seed: int, n: int = 30000, d: int = 16, n_shared: int = 12, n_only: int = 5):
    """Two models' activations from one sparse code over planted atoms: shared atoms (each model its own, related
    direction), atoms only the base writes and atoms only the tuned model writes. Returns (x_base, x_tuned, D_base,
    D_tuned) with D [atoms, d] (zero rows where a model lacks the atom)."""
    rng = np.random.default_rng(seed)

    def unit(k):
        v = rng.normal(size=(k, d))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    shared_b = unit(n_shared)
    shared_t = shared_b + 0.3 * unit(n_shared)
    shared_t /= np.linalg.norm(shared_t, axis=1, keepdims=True)
    zeros = np.zeros((n_only, d))
    Db = np.concatenate([shared_b, unit(n_only), zeros])
    Dt = np.concatenate([shared_t, zeros, unit(n_only)])
    atoms = len(Db)
    codes = (rng.random((n, atoms)) < 3 / atoms) * rng.exponential(2.0, (n, atoms))
    xb = codes @ Db + 0.01 * rng.normal(size=(n, d)) + 0.5
    xt = codes @ Dt + 0.01 * rng.normal(size=(n, d)) - 0.3
    return xb, xt, Db, Dt


def fit(xs: list[np.ndarray], tmp_path: Path, n_latents: int = 44, passes: int = 6, seed: int = 0, **over):
    n = int(len(xs[0]) * 0.9)
    train_t = [torch.tensor(x[:n], dtype=torch.float16) for x in xs]
    held = [torch.tensor(x[n:], dtype=torch.float16) for x in xs]
    cc = Crosscoder(len(xs), xs[0].shape[1], n_latents, seed=seed)
    train(cc, [Pass(n, s, lambda: train_t) for s in range(passes)], checkpoint=tmp_path / "cc.pt", key="k",
          **{**TRAIN, **over})
    return cc, held


def test_batch_topk_keeps_exactly_k_times_batch():
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(37, 50, generator=g) + 0.01
    scores = acts * torch.rand(50, generator=g)
    out = batch_topk(acts, scores, 3)
    assert int((out > 0).sum()) == 3 * 37
    kept = scores[out > 0]
    assert float(kept.min()) >= float(scores[out == 0].max())  # the k*B largest scores, across rows
    assert torch.equal(out[out > 0], acts[out > 0])  # kept values are the activations themselves
    rows = (out > 0).sum(1)
    assert int(rows.max()) != int(rows.min())  # per batch, not per token: rows differ in how many they keep


def test_planted_dictionary_is_recovered_with_its_classes(tmp_path):
    xb, xt, Db, Dt = planted(seed=0)
    cc, held = fit([xb, xt], tmp_path)
    table = classify(evaluate(cc, held), cc.W_dec.detach().numpy(), ["base", "tuned"])
    W = cc.W_dec.detach().numpy() / cc.input_scale.numpy()[None, :, None]  # raw units
    atoms = np.concatenate([Db, Dt], 1)
    latents = W.reshape(len(W), -1)
    cos = (atoms / np.linalg.norm(atoms, axis=1, keepdims=True)) @ (latents / np.linalg.norm(latents, axis=1, keepdims=True)).T
    best = cos.argmax(1)
    assert cos.max(1).mean() > 0.95 and cos.max(1).min() > 0.7
    want = ["shared"] * 12 + ["base-only"] * 5 + ["tuned-only"] * 5
    assert [table.klass[j] for j in best] == want
    assert table.model_only() == {"base-only": 5, "tuned-only": 5}
    assert max(table.frequency) > 0 and table.n_tokens == len(held[0])


def test_identical_models_give_no_model_only_latent(tmp_path):
    xb, _, _, _ = planted(seed=1)
    cc, held = fit([xb, xb], tmp_path / "same")
    table = classify(evaluate(cc, held), cc.W_dec.detach().numpy(), ["base", "copy"])
    assert table.model_only() == {"base-only": 0, "copy-only": 0}
    assert not any(c.endswith("-only") for c in table.norm_class)
    alive = np.array([c != "dead" for c in table.klass])
    assert np.all(np.abs(table.nrn[1][alive] - 0.5) < 0.1)
    # as a null control beside a pair that does differ: the excess is the pair's whole model-only count
    xb2, xt2, _, _ = planted(seed=0)
    cc2, held2 = fit([xb2, xt2], tmp_path / "pair")
    pair = classify(evaluate(cc2, held2), cc2.W_dec.detach().numpy(), ["base", "tuned"])
    compared = null_comparison(pair, table)
    assert compared["spurious_model_only"] == 0 and compared["excess_over_null"] == pair.model_only()


def _numpy_code(cc: Crosscoder, xs: list[np.ndarray]):
    """f [n, F], x [n, m, d], x_hat [n, m, d] recomputed in numpy (float64) from the crosscoder's weights."""
    W_enc, b_enc = cc.W_enc.detach().double().numpy(), cc.b_enc.detach().double().numpy()
    W_dec, b_dec = cc.W_dec.detach().double().numpy(), cc.b_dec.detach().double().numpy()
    x = np.stack([np.asarray(t, np.float64) for t in xs], 1) * cc.input_scale.double().numpy()[None, :, None]
    pre = np.maximum(np.einsum("nmd,mdf->nf", x, W_enc) + b_enc, 0.0)
    f = pre * (pre * np.linalg.norm(W_dec, axis=-1).sum(-1) > float(cc.theta))
    return f, x, np.einsum("nf,fmd->nmd", f, W_dec) + b_dec, W_dec, b_dec


def test_closed_form_beta_equals_least_squares(tmp_path):
    xb, xt, _, _ = planted(seed=2, n=8000)
    cc, held = fit([xb, xt], tmp_path, passes=2)
    sums = evaluate(cc, held)
    table = classify(sums, cc.W_dec.detach().numpy(), ["base", "tuned"])
    f, x, x_hat, W_dec, b_dec = _numpy_code(cc, [h.double().numpy() for h in held])
    checked = 0
    for j in np.flatnonzero(table.frequency > 0.02)[:6]:
        u = W_dec[j, table.owner[j]]
        design = (f[:, j, None] * u).reshape(-1, 1)
        for i in range(2):
            y_eps = x[:, i] - x_hat[:, i] + f[:, j, None] * W_dec[j, i]
            y_rec = x_hat[:, i] - b_dec[i] - f[:, j, None] * W_dec[j, i]
            for y, got in ((y_eps, table.beta_eps[i, j]), (y_rec, table.beta_rec[i, j])):
                lstsq = np.linalg.lstsq(design, y.reshape(-1), rcond=None)[0][0]
                assert got == pytest.approx(lstsq, rel=1e-5, abs=1e-7)
                assert scaling_beta(f[:, j], y, u) == pytest.approx(lstsq, rel=1e-9, abs=1e-12)
            checked += 1
    assert checked >= 8
    fvu = ((x - x_hat) ** 2).sum((0, 2)) / ((x - x.mean(0)) ** 2).sum((0, 2))
    np.testing.assert_allclose(sums.fvu(), fvu, rtol=1e-4)


def test_latent_scaling_unmasks_a_decoupled_pair():
    """Hand-built: one feature present in both models but split into a base-only and a tuned-only latent
    (decoupled) is caught by latent scaling; a feature only the tuned model has stays tuned-only."""
    d, n = 4, 4000
    rng = np.random.default_rng(0)
    a, b = rng.exponential(1.0, n) * (rng.random(n) < 0.3), rng.exponential(1.0, n) * (rng.random(n) < 0.3)
    e = np.eye(d)
    xb = np.outer(a, e[1])  # feature a in both models, feature b only in the tuned one
    xt = np.outer(a, e[1]) + np.outer(b, e[2])
    cc = Crosscoder(2, d, 3)
    with torch.no_grad():
        cc.input_scale.fill_(1.0)
        cc.theta.fill_(0.0)
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        cc.W_enc.zero_()
        cc.W_dec.zero_()
        cc.W_enc[1, :, 0] = torch.tensor(e[1])  # latent 0 reads a from the tuned model, writes it there only
        cc.W_dec[0, 1] = torch.tensor(e[1])
        cc.W_enc[0, :, 1] = torch.tensor(e[1])  # latent 1 reads a from the base, writes it there only
        cc.W_dec[1, 0] = torch.tensor(e[1])
        cc.W_enc[1, :, 2] = torch.tensor(e[2])  # latent 2: b, tuned only
        cc.W_dec[2, 1] = torch.tensor(e[2])
    data = [torch.tensor(xb, dtype=torch.float16), torch.tensor(xt, dtype=torch.float16)]
    table = classify(evaluate(cc, data), cc.W_dec.detach().numpy(), ["base", "tuned"])
    assert table.norm_class == ["tuned-only", "base-only", "tuned-only"]
    assert table.klass == ["tuned-only-norm", "base-only-norm", "tuned-only"]
    nu_eps, nu_rec = table.nu()
    assert nu_rec[0] == pytest.approx(1.0, rel=1e-3) and abs(nu_eps[2]) < 1e-6 and abs(nu_rec[2]) < 1e-6


class _Boom:
    """A tensor whose rows can be read `limit` times, then a simulated kill."""

    def __init__(self, t, limit):
        self.t, self.limit, self.shape = t, limit, t.shape

    def __getitem__(self, idx):
        self.limit -= 1
        if self.limit < 0:
            raise KeyboardInterrupt("killed")
        return self.t[idx]


def test_training_resumes_to_the_same_weights(tmp_path):
    xb, xt, _, _ = planted(seed=3, n=4000)
    data = [torch.tensor(xb, dtype=torch.float16), torch.tensor(xt, dtype=torch.float16)]
    passes = [Pass(4000, s, lambda: data) for s in range(2)]
    whole = Crosscoder(2, 16, 32, seed=0)
    train(whole, passes, checkpoint=tmp_path / "whole.pt", key="k", checkpoint_every=10, **TRAIN)
    opts = dict(k=3, lr=1e-2, batch_size=128, aux_coef=1 / 32, dead_tokens=2000, checkpoint=tmp_path / "cut.pt",
                key="k", checkpoint_every=10, log=lambda _: None)
    first = Trainer(Crosscoder(2, 16, 32, seed=0), 62, **opts)
    with pytest.raises(KeyboardInterrupt):
        first.run(passes[0], 0, [_Boom(t, 1 + 25) for t in data])  # 1 read sets the scales; killed at step 25 (checkpoint: 20)
    resumed = Crosscoder(2, 16, 32, seed=0)
    again = Trainer(resumed, 62, **opts)
    assert again.step == 20
    again.run(passes[0], 0)
    again.run(passes[1], 31)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_matched_random_sets():
    rng = np.random.default_rng(0)
    magnitude = rng.lognormal(0, 2, 400)
    alive = rng.random(400) > 0.1
    targeted = [int(j) for j in np.argsort(-magnitude)[10:15] if alive[j]]
    draws = matched_random(targeted, magnitude, alive, 5, pool=10, seed=0)
    assert len(draws) == 5
    candidates = np.array([j for j in np.flatnonzero(alive) if j not in targeted])
    for draw in draws:
        assert len(draw) == len(set(draw)) == len(targeted)
        assert not set(draw) & set(targeted) and all(alive[j] for j in draw)
        for t, r in zip(targeted, draw):  # r is among the 10 + len(targeted) candidates closest to t in log size
            closeness = np.sort(np.abs(np.log(magnitude[candidates]) - np.log(magnitude[t])))
            assert abs(np.log(magnitude[r]) - np.log(magnitude[t])) <= closeness[10 + len(targeted)]
    assert draws != matched_random(targeted, magnitude, alive, 5, pool=10, seed=1)


@pytest.mark.parametrize("rho, want", [
    ([1.0, 0.9, 0.5], "shared"), ([1.0, 0.05, 0.1], "base-only"), ([0.05, 1.0, 0.0], "sft-only"),
    ([0.0, 0.0, 1.0], "tuned-only"), ([0.05, 0.8, 1.0], "sft+tuned"), ([1.0, 0.2, 0.05], "intermediate"),
    ([1.0, 0.43, 0.5], "shared"), ([1.0, 0.42, 0.5], "intermediate"),
])
def test_norm_classes_for_three_models(rho, want):
    assert norm_class(np.array(rho), ["base", "sft", "tuned"], Thresholds()) == want


def test_two_model_thresholds_are_the_relative_norm_ones():
    """rho thresholds 1/9 and 3/7 are r < 0.1 / r > 0.9 and 0.3 <= r <= 0.7 for r = n_tuned / (n_base + n_tuned)."""
    for r in np.linspace(0.005, 0.995, 199):
        rho = np.array([1 - r, r]) / max(1 - r, r)
        got = norm_class(rho, ["base", "tuned"], Thresholds())
        want = ("base-only" if r < 0.1 else "tuned-only" if r > 0.9 else "shared" if 0.3 <= r <= 0.7 else
                "intermediate")
        if min(abs(r - t) for t in (0.1, 0.3, 0.7, 0.9)) > 1e-9:
            assert got == want, r


def test_massive_activations_are_left_out(tmp_path):
    """Rows whose norm exceeds 10x the median are flagged, and training reads only the rows it is given: the input
    scale comes from the kept rows alone."""
    from circuitdiff.features.activations import outliers

    xb, xt, _, _ = planted(seed=4, n=3000)
    xb[[5, 700]] *= 400.0  # two massive activations in the base model only
    data = [torch.tensor(xb, dtype=torch.float16), torch.tensor(xt, dtype=torch.float16)]
    flagged = outliers(data[0]) | outliers(data[1])
    assert np.flatnonzero(flagged).tolist() == [5, 700]
    keep = torch.from_numpy(np.flatnonzero(~flagged))
    cc = Crosscoder(2, 16, 32, seed=0)
    trainer = Trainer(cc, 23, checkpoint=tmp_path / "o.pt", key="k", **TRAIN)
    trainer.run(Pass(3000, 0, lambda: data), 0, data, keep)
    kept = xb[~flagged].astype(np.float16).astype(np.float64)
    assert float(cc.input_scale[0]) == pytest.approx(np.sqrt(16 / (kept**2).sum(1).mean()), rel=1e-6)
    assert trainer.step == 23
