"""`features(run_dir, ...)`: every step of feature-level diffing over a run directory, in order; a rerun resumes.

1. token plan and activations (activations.py), 2. the main and the null crosscoder (crosscoder.py),
3. classes beside the null control (classes.py), 4. attribution and the compact set (attribution.py),
5. interventions (interventions.py, via steps.py), 6. outputs (outputs.py). Models are loaded when a step has
work for them; the plan, the shards, the crosscoders, the attribution and each intervention condition are
kept on disk as they finish (keyed), so a kill loses at most the work in progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from circuitdiff.errors import UserError
from circuitdiff.features import activations as A
from circuitdiff.features.settings import FeatureSettings
from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import settings_key, up_to_date, write_key


@dataclass(frozen=True)
class ModelRef:
    label: str
    spec: str


def resolve_models(run: Path, models: list[str] | None) -> list[ModelRef]:
    """`base`, `tuned` (the run's models) or `label=spec`; default: base and tuned. The first is the reference."""
    refs = []
    for item in models or ["base", "tuned"]:
        if item in layout.ROLES:
            refs.append(ModelRef(item, artifacts.run_model(run, item)[0]))
        elif "=" in item and item.split("=", 1)[0] and item.split("=", 1)[1]:
            label, spec = item.split("=", 1)
            refs.append(ModelRef(label, spec))
        else:
            raise UserError(f"--models {item!r}: use base, tuned (the run's models) or label=spec (e.g. sft=path/to/sft)")
    labels = [r.label for r in refs]
    if len(refs) < 2 or len(set(labels)) != len(labels):
        raise UserError(f"--models {' '.join(models or [])}: a crosscoder needs at least two models with distinct labels")
    if any(not label.replace("-", "").replace("_", "").isalnum() or label == "null" for label in labels):
        raise UserError(f"--models: labels {labels} must be letters, digits, - or _ (and not 'null')")
    return refs


def check_models(refs: list[ModelRef], layer: int | None):
    """(tokenizer, layer, n_layers, d_model): the same tokenizer and shape everywhere, the layer in range."""
    from circuitdiff.models.checks import check_spec, config_for, tokenizer_difference, tokenizer_for

    for ref in refs:
        check_spec(ref.spec)
    toks = {ref.label: tokenizer_for(ref.spec) for ref in refs}
    first = refs[0]
    for ref in refs[1:]:
        why = tokenizer_difference(toks[first.label], toks[ref.label])
        if why:
            raise UserError(f"the tokenizers of {first.label} and {ref.label} differ ({why}); a crosscoder reads every "
                            "model on the same tokens: compare models that share one tokenizer")
    shapes = {}
    for ref in refs:
        cfg = config_for(ref.spec)
        cfg = getattr(cfg, "text_config", None) or cfg
        shapes[ref.label] = (int(cfg.num_hidden_layers), int(cfg.hidden_size))
    if len(set(shapes.values())) > 1:
        raise UserError(f"the models differ in (layers, d_model): {shapes}; a crosscoder needs one shape")
    n_layers, d_model = shapes[first.label]
    layer = n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer} is out of range: the models have {n_layers} decoder layers (0..{n_layers - 1}); "
                        f"pick one of them (default: the middle, {n_layers // 2})")
    return toks[first.label], layer, n_layers, d_model


class Models:
    """Loads models when a step needs them; `keep` names those that stay in memory."""

    def __init__(self, dtype: str, device: str):
        self.dtype, self.device, self.loaded = dtype, device, {}

    def get(self, ref: ModelRef):
        if ref.label not in self.loaded:
            from circuitdiff.models import load_model

            self.loaded[ref.label] = load_model(ref.spec, self.dtype, self.device, tokenizer=False).model.eval()
        return self.loaded[ref.label]

    def keep(self, labels) -> None:
        for label in [x for x in self.loaded if x not in labels]:
            del self.loaded[label]


def token_plan(run: Path, folder: Path, tokenizer, s: FeatureSettings, log) -> tuple[A.Plan, str]:
    gens = {f"{role}/{d}": artifacts.generation_key(run, role, d) for role in layout.ROLES
            for d in layout.find_generations(run, role)} if "run" in s.text else {}
    record = {"settings": s.keyed("tokens", "ctx_len", "text", "seed", "shard_tokens", "held_out"), "generations": gens,
              "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""), "size": len(tokenizer),
                            "probe": tokenizer("12 + 30 = 42", add_special_tokens=True)["input_ids"]}}
    key, path = settings_key(record), layout.features_file(folder, "tokens")
    if up_to_date(path, key, log):
        return A.Plan.load(path), key
    plan = A.build_plan(run, tokenizer, s.tokens, s.ctx_len, tuple(s.text), s.seed, s.shard_tokens, s.held_out)
    plan.save(path)
    write_key(path, key, record)
    log(f"token plan: {s.tokens} positions per model in {plan.n_shards} shards ({plan.n_held_out} held out); "
        f"sources {plan.source_tokens()}")
    return plan, key


def features(run_dir: str | Path, models: list[str] | None = None, settings: FeatureSettings | None = None, *,
             out: str | Path | None = None, dtype: str | None = None, device: str = "cpu", log=print,
             progress: bool = False) -> Path:
    """Feature-level diffing of the run's models (see docs/features.md); returns the features folder."""
    from circuitdiff import io
    from circuitdiff.features import steps

    run = Path(run_dir)
    if not layout.manifest(run).exists():
        raise UserError(f"{run} is not a run directory (no manifest.json); pass a directory `circuitdiff run` wrote")
    s = (settings or FeatureSettings()).check()
    refs = resolve_models(run, models)
    null_ref = ModelRef("null", s.null_model) if s.null_model else None
    tokenizer, layer, n_layers, d_model = check_models(refs + ([null_ref] if null_ref else []), s.layer)
    dtype = dtype or artifacts.run_model(run, "base")[1]
    folder = Path(out) if out is not None else layout.features_layer(run, layer)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    plan, plan_key = token_plan(run, folder, tokenizer, s, log)
    train_rows = sum(plan.n_rows(x) for x in plan.train_shards())
    if train_rows < 10 * s.batch_size:
        raise UserError(f"--tokens {s.tokens}: {train_rows} training tokens make fewer than 10 batches of "
                        f"{s.batch_size}; raise --tokens (at least {int(10 * s.batch_size / (1 - s.held_out)) + 1}) "
                        "or lower --batch-size")
    timings["plan"] = time.perf_counter() - t0
    ctx = steps.Context(run=run, folder=folder, settings=s, refs=refs, null_ref=null_ref, plan=plan, plan_key=plan_key,
                        layer=layer, n_layers=n_layers, d_model=d_model, dtype=dtype, device=device,
                        models=Models(dtype, device), tokenizer=tokenizer, log=log, progress=progress, timings=timings)
    steps.activations(ctx)
    steps.crosscoders(ctx)
    steps.classes(ctx)
    steps.attribution(ctx)
    steps.interventions(ctx)
    steps.outputs(ctx)
    io.write_json(layout.features_file(folder, "timings"), {k: round(v, 3) for k, v in timings.items()})
    log("features: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f"; wrote {folder}")
    return folder
