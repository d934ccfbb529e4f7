"""Stage `attribute`: the edge scores W of both models on the selected samples (circuitdiff.attribute).

One W file per (role, dataset, alpha): the role's prompt + its own answer cut at T_cut, for the
selected questions in selection order. Its key holds the attribution settings and the keys of
its inputs (the role's generations and the selection); an unfinished attribution keeps its
finished batches in ``alpha={a}.parts/`` and resumes from them.
"""

from __future__ import annotations

import shutil

import numpy as np

from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import read_key, settings_key, up_to_date, write_key


def conventions(granularity: str) -> dict:
    from circuitdiff.attribute import LOSS_CONVENTION, SIGN_CONVENTION

    return {"granularity": granularity, "loss": LOSS_CONVENTION, "sign": SIGN_CONVENTION,
            "score_dtype": "float32 (float64 for float64 models)"}


def inputs(ctx, role: str, ds, alpha: float) -> dict:
    """The attribution settings and input keys of one W file."""
    cfg = ctx.config
    return {
        "settings": {"granularity": cfg.granularity, "dtype": cfg.dtype, "model": getattr(cfg, role).spec,
                     "attn_implementation": cfg.attn_implementation},
        "selection": read_key(layout.selection(ctx.run, ds.key, alpha)),
        "generation": artifacts.generation_key(ctx.run, role, ds.key),
    }


def stage(ctx) -> None:
    for role in ("tuned", "base"):  # tuned first: it is often the model still loaded
        for ds in ctx.config.datasets:
            for alpha in ctx.config.alphas:
                attribute_one(ctx, role, ds, alpha)


def attribute_one(ctx, role: str, ds, alpha: float) -> None:
    from circuitdiff.attribute import attribute

    cfg = ctx.config
    record = inputs(ctx, role, ds, alpha)
    key = settings_key(record)
    out = layout.attribution(ctx.run, role, ds.key, alpha)
    if up_to_date(out, key, ctx.log):
        ctx.log(f"attribute {role} {ds.key} alpha={alpha}: up to date ({out})")
        return
    samples, where = artifacts.selected_samples(ctx.run, role, ds.key, alpha)
    sel = artifacts.read_selection(ctx.run, ds.key, alpha)
    parts = layout.attribution_parts(ctx.run, role, ds.key, alpha)
    ctx.log(f"attribute {role} {ds.key} alpha={alpha}: {len(samples)} samples, T_cut={where['T_cut']}, "
            f"granularity={cfg.granularity}")
    result = attribute(ctx.models.get(role), samples, granularity=cfg.granularity, batch_size=cfg.attr_batch_size,
                       gradient_checkpointing=cfg.gradient_checkpointing, work_dir=parts, progress=ctx.progress)
    result.meta.update({"role": role, "dataset": ds.key, "alpha": alpha, "idx": where["idx"],
                        "T_cut": where["T_cut"], "T_bar": sel["T_bar"], "selection": sel["settings"]})
    result.save(out)
    write_key(out, key, record)
    shutil.rmtree(parts, ignore_errors=True)
    mean_abs = float(np.abs(result.scores).mean())
    ctx.log(f"attribute {role} {ds.key} alpha={alpha}: wrote {out}; mean |W| over all "
            f"{result.scores.shape[1]}x{result.scores.shape[2]} entries = {mean_abs:.4g}, mean loss "
            f"{float(result.loss.mean()):.4f} (granularity={cfg.granularity}, loss: mean NLL of the "
            f"first T_cut={where['T_cut']} answer tokens)")
