"""Stage `attribute`: the edge scores W of both models on the selected samples (circuitdiff.attribute).

One W file per (objective, method, model, text, dataset, alpha): model `role` reads the prompt + answer of
`text` (its own by default; config `text: base|tuned|both` adds the same-text views, so that both
models are scored on identical tokens), cut at T_cut, for the selected questions in selection
order. Its key holds the attribution settings and the keys of its inputs (the text's generations
and the selection); an unfinished attribution keeps its finished batches in ``alpha={a}.parts/``
and resumes from them.
"""

from __future__ import annotations

import shutil

import numpy as np

from circuitdiff.choices import OBJECTIVES
from circuitdiff.errors import UserError
from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import read_key, settings_key, up_to_date, write_key


def conventions(granularity: str, objectives=("nll",), text: str = "own", methods: dict | None = None) -> dict:
    """The attribution conventions of a run; methods: {label: definition} (default EAP only)."""
    from circuitdiff.attribute import SIGN_CONVENTION, loss_convention
    from circuitdiff.choices import METHODS, TEXTS

    return {"granularity": granularity, "objective": {o: loss_convention(o) for o in objectives},
            "method": methods or {"eap": METHODS["eap"]},
            "text": f"{text}: {TEXTS[text]}", "sign": SIGN_CONVENTION, "score_dtype": "float32 (float64 for float64 models)"}


def inputs(ctx, role: str, text: str, ds, alpha: float, objective: str, method: str = "eap") -> dict:
    """The attribution settings and input keys of one W file (an EAP file's settings name no method: the key
    of W files written before EAP-IG existed stays valid)."""
    cfg = ctx.config
    settings = {"granularity": cfg.granularity, "dtype": cfg.dtype, "model": getattr(cfg, role).spec,
                "attn_implementation": cfg.attn_implementation, "objective": objective, "text": text}
    if method != "eap":
        settings["method"] = cfg.label(method)
    return {
        "settings": settings,
        "selection": read_key(layout.selection(ctx.run, ds.key, alpha)),
        "generation": artifacts.generation_key(ctx.run, text, ds.key),
    }


def stage(ctx) -> None:
    views = ctx.config.views()
    for role in ("tuned", "base"):  # tuned first: it is often the model still loaded
        for objective in ctx.config.objective:
            for method in ctx.config.method:
                for model, text in views:
                    if model != role:
                        continue
                    for ds in ctx.config.datasets:
                        for alpha in ctx.config.alphas:
                            attribute_one(ctx, role, text, ds, alpha, objective, method)


def attribute_one(ctx, role: str, text: str, ds, alpha: float, objective: str = "nll", method: str = "eap") -> None:
    from circuitdiff.attribute import attribute

    cfg = ctx.config
    record = inputs(ctx, role, text, ds, alpha, objective, method)
    key = settings_key(record)
    label = cfg.label(method)
    out = layout.attribution(ctx.run, role, ds.key, alpha, text, objective, label)
    name = f"attribute {layout.view(role, text)} {ds.key} alpha={alpha} objective={objective} method={label}"
    if up_to_date(out, key, ctx.log):
        ctx.log(f"{name}: up to date ({out})")
        return
    samples, where = artifacts.selected_samples(ctx.run, text, ds.key, alpha)
    if text != role:
        _check_same_tokens(ctx, role, text, ds, where["idx"])
    sel = artifacts.read_selection(ctx.run, ds.key, alpha)
    parts = layout.attribution_parts(ctx.run, role, ds.key, alpha, text, objective, label)
    ctx.log(f"{name}: {len(samples)} samples, T_cut={where['T_cut']}, granularity={cfg.granularity}")
    common = dict(granularity=cfg.granularity, batch_size=cfg.attr_batch_size, objective=objective, method=method,
                  gradient_checkpointing=cfg.gradient_checkpointing, ig_steps=cfg.ig_steps, ig_rule=cfg.ig_rule)
    pool = ctx.pool()
    if pool is None:
        result = attribute(ctx.models.get(role), samples, work_dir=parts, progress=ctx.progress, log=ctx.log, **common)
    else:
        from circuitdiff.parallel.attribution import attribute_sharded

        parts = layout.attribution_shards(ctx.run, role, ds.key, alpha, text, objective, label)
        model_cfg = getattr(cfg, role)
        result = attribute_sharded(pool, model_cfg.spec, samples, work_dir=parts, dtype=cfg.dtype, device=cfg.device,
                                   attn_implementation=cfg.attn_implementation,
                                   trust_remote_code=model_cfg.trust_remote_code, name=name, log=ctx.log, **common)
    result.meta.update({"role": role, "text": text, "dataset": ds.key, "alpha": alpha, "idx": where["idx"],
                        "T_cut": where["T_cut"], "T_bar": sel["T_bar"], "selection": sel["settings"]})
    result.save(out)
    write_key(out, key, record)
    shutil.rmtree(parts, ignore_errors=True)
    mean_abs = float(np.abs(result.scores).mean())
    ctx.log(f"{name}: wrote {out}; mean |W| over all {result.scores.shape[1]}x{result.scores.shape[2]} entries = "
            f"{mean_abs:.4g}, mean objective {float(result.loss.mean()):.4f} (method {label}, granularity={cfg.granularity}; "
            f"{OBJECTIVES[objective]}, first T_cut={where['T_cut']} tokens of the {text} model's answers)")


def _check_same_tokens(ctx, role: str, text: str, ds, idx: list) -> None:
    """Scoring one model on the other's tokens needs one tokenizer: checked before any work (pipeline), refused
    when the run allows different tokenizers; here the two prompts of a question must be the same ids when both
    models use the same prompt preset, and every id must be inside the model's vocabulary."""
    if ctx.config.allow_different_tokenizers:
        raise UserError(f"text: {text}: same-text scoring needs one tokenizer, and this run allows different ones "
                        "(allow_different_tokenizers: true); use text: own")
    rows = {r: {row["idx"]: row for row in artifacts.read_generations(ctx.run, r, ds.key)} for r in (role, text)}
    if ctx.config.prompt_for(role) == ctx.config.prompt_for(text):
        differ = [i for i in idx if rows[role][i]["prompt_ids"] != rows[text][i]["prompt_ids"]]
        if differ:
            raise UserError(f"text: {text}: the {role} and {text} models encode question {differ[0]} differently "
                            "(different tokenizers); same-text scoring needs one tokenizer: use text: own")
    if ctx.pool() is not None:  # the model lives in the workers, which check every id against it
        return
    vocab = ctx.models.get(role).model.get_input_embeddings().weight.shape[0]
    top = max(max(rows[text][i]["prompt_ids"] + rows[text][i]["answer_ids"]) for i in idx)
    if top >= vocab:
        raise UserError(f"text: {text}: token id {top} of the {text} model's answers is outside the {role} model's "
                        f"vocabulary ({vocab}); same-text scoring needs one tokenizer: use text: own")
