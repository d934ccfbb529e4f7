"""The demo's settings (validation of both models) and the model loads of a run, on tiny models (no SmolLM2)."""

import circuitdiff.models
from circuitdiff.demo import demo_config
from circuitdiff.pipeline import run
from circuitdiff.store import layout
from test_run import make_config, pair, world  # noqa: F401  (fixtures: the tiny pair and its questions)


def test_demo_validates_both_models():
    cfg = demo_config(tuned="some/adapter")
    assert sorted(cfg.validation.roles) == ["base", "tuned"]
    assert demo_config(tuned="some/adapter", validate_samples=0).validation is None


def test_validation_starts_with_the_model_in_memory(pair, world, tmp_path, monkeypatch):  # noqa: F811
    """generate base, generate tuned, attribute tuned, attribute base, then validation of base (still loaded) and
    tuned: 4 loads; in the configured order (tuned first) it would be 5. The results do not depend on the order."""
    loads = []
    original = circuitdiff.models.load_model

    def counting(spec, *args, **kwargs):
        loads.append(spec)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(circuitdiff.models, "load_model", counting)
    cfg = make_config(pair, world["data"], validation={"roles": ["tuned", "base"], "n_samples": 1, "max_edges": 20})
    run(cfg, tmp_path / "run", progress=False, log=lambda *_: None, until="validation")
    assert loads == [str(pair[0]), str(pair[1]), str(pair[0]), str(pair[1])]
    for role in layout.ROLES:
        assert layout.validation(tmp_path / "run", role, "gsm8k", 0.1).exists()

