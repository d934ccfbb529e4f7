"""EAP-IG (integrated gradients from the all-zero input to the clean one) against independent computations.

The reference integrand is the gated re-implementation of tests/oracle.py with the embedding scaled by t and
probe gates that add the CLEAN source outputs to each destination input: -dL/dprobe[d, u] is
-<dL/dx_d at t, O_u clean>, by autograd, sharing no code with the engine's hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import ig_integrand, naive_gated_forward
from test_engine_exact import assert_close
from tiny import tiny_model, tiny_samples

from circuitdiff.attribute import attribute
from circuitdiff.engine.attributor import ig_points
from circuitdiff.errors import UserError


def clean_sources(model, sample, granularity):
    kept = []
    with torch.no_grad():
        naive_gated_forward(model, [sample], granularity, keep=kept)
    return kept


def test_one_step_at_t_1_is_eap_exactly():
    model = tiny_model("llama")
    samples = tiny_samples(30, 3)
    eap = attribute(model, samples, batch_size=3)
    ig = attribute(model, samples, batch_size=3, method="eap-ig", ig_steps=1, ig_rule="right")
    np.testing.assert_array_equal(ig.scores, eap.scores)
    np.testing.assert_array_equal(ig.loss, eap.loss)
    assert ig.meta["method"] == "eap-ig1-right" and eap.meta["method"] == "eap"


@pytest.mark.parametrize("arch,granularity,objective", [("llama", "block", "nll"), ("qwen3", "qkv", "logit"),
                                                        ("mistral", "head", "nll")])
def test_each_step_equals_the_oracle_integrand(arch, granularity, objective):
    """The engine's sum over the quadrature points is the same weighted sum of independently computed integrands."""
    model = tiny_model(arch)
    samples = tiny_samples(31, 2)
    ig = attribute(model, samples, granularity=granularity, batch_size=2, method="eap-ig", ig_steps=3,
                   ig_rule="midpoint", objective=objective)
    for k, sample in enumerate(samples):
        clean = clean_sources(model, sample, granularity)
        expected = sum(w * ig_integrand(model, sample, t, clean, granularity, objective) for t, w in ig_points(3, "midpoint"))
        assert_close(ig.scores[k], expected.numpy())


@pytest.mark.parametrize("rule,bound", [("gauss", 1e-3), ("midpoint", 1e-2)])
def test_converges_to_the_integral(rule, bound):
    """As K grows, the quadrature approaches the integral (composite Simpson, 256 intervals, on the oracle).
    Bounds: the integrand is smooth on [0, 1] for these tiny models, so Gauss-Legendre's error falls
    geometrically and the midpoint rule's as 1/K^2 (measured: 4e-5 and 9e-4 at K = 16)."""
    model = tiny_model("qwen2")
    sample = tiny_samples(32, 1)[0]
    clean = clean_sources(model, sample, "block")
    grid = np.linspace(0.0, 1.0, 257)
    values = np.stack([ig_integrand(model, sample, float(t), clean).numpy() for t in grid])
    simpson = np.array([1] + [4, 2] * 127 + [4, 1], dtype=np.float64) / (3 * 256)
    integral = np.tensordot(simpson, values, axes=1)
    scale = np.abs(integral).max()
    errors = {}
    for steps in (1, 2, 4, 8, 16):
        W = attribute(model, [sample], method="eap-ig", ig_steps=steps, ig_rule=rule).scores[0]
        errors[steps] = np.abs(W - integral).max() / scale
    assert errors[16] < bound and errors[16] < errors[4] < errors[1], errors
    eap = attribute(model, [sample]).scores[0]
    assert np.abs(eap - integral).max() / scale > 10 * errors[16]  # the integral is not the end point


def test_bad_settings_are_one_line():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="method 'ig' is unknown"):
        attribute(model, tiny_samples(0, 1), method="ig")
    with pytest.raises(UserError, match="ig steps 0 must be >= 1"):
        attribute(model, tiny_samples(0, 1), method="eap-ig", ig_steps=0)
    with pytest.raises(UserError, match="ig rule 'simpson' is unknown"):
        attribute(model, tiny_samples(0, 1), method="eap-ig", ig_rule="simpson")
