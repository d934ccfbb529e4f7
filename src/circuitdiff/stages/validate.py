"""Stage `validation`: EAP (or EAP-IG) vs exact edge ablation on the first selected samples of a run (circuitdiff.validate).

Output: validation/{scoring}/{role}/{dataset}/alpha={a}.json (+ the scatter PNG beside it), keyed by the
validation settings, the model and dtype, and the keys of the samples' inputs (the role's
generations and the selection). Runs in `circuitdiff run` when the config has a `validation:`
section, and from `circuitdiff validate --run`.
"""

from __future__ import annotations

from pathlib import Path

from circuitdiff.config import ValidationConfig
from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import read_key, settings_key, up_to_date, write_key

UNKEYED = {"batch_size"}  # settings that do not change a result
IG_ONLY = {"method", "ig_steps", "ig_rule"}  # left out of an EAP result's key: keys from before EAP-IG stay valid


def inputs(run: Path, role: str, dataset: str, alpha: float, settings: ValidationConfig, spec: str, dtype: str) -> dict:
    unkeyed = UNKEYED | {"roles", "dataset", "alpha"} | (IG_ONLY if settings.method == "eap" else set())
    return {
        "settings": settings.model_dump(exclude=unkeyed),
        "role": role, "dataset": dataset, "alpha": alpha, "model": spec, "dtype": dtype,
        "selection": read_key(layout.selection(run, dataset, alpha)),
        "generation": artifacts.generation_key(run, role, dataset),
    }  # fmt: skip


def validate_one(run: str | Path, role: str, dataset: str, alpha: float, settings: ValidationConfig, *,
                 get_model=None, dtype: str | None = None, device: str = "cpu", out: Path | None = None,
                 progress: bool = False, log=print):
    """Validate the first n selected samples of `role`; returns the Validation (read back when up to date).

    get_model: a function returning the loaded model (called only when the work is not up to date);
    None loads the role's model from the manifest (in the run's dtype unless `dtype` is given).
    out: the JSON path (default the run's validation file).
    """
    from circuitdiff.validate import Validation, summary_line, validate

    run = Path(run)
    samples, where = artifacts.selected_samples(run, role, dataset, alpha, settings.n_samples)
    spec, run_dtype = artifacts.run_model(run, role)
    dtype = dtype or run_dtype
    record = inputs(run, role, dataset, alpha, settings, spec, dtype)
    key = settings_key(record)
    path = Path(out) if out is not None else layout.validation(run, role, dataset, alpha, settings.objective,
                                                                            settings.label(settings.method))
    if up_to_date(path, key, log):
        result = Validation.load(path)
        log(f"validate {role} {dataset} alpha={alpha}: up to date ({path}); {summary_line(result)}")
        return result
    result = validate(spec if get_model is None else get_model(), samples, granularity=settings.granularity,
                      max_edges=settings.max_edges, seed=settings.seed, batch_size=settings.batch_size, dtype=dtype,
                      device=device, sign_threshold=settings.sign_threshold, objective=settings.objective,
                      method=settings.method, ig_steps=settings.ig_steps, ig_rule=settings.ig_rule, progress=progress)
    result.meta.update({**where, "role": role, "dataset": dataset, "alpha": alpha})  # paths relative: a run can move
    result.save(path, layout.validation_figure(path))
    write_key(path, key, record)
    if out is None:
        from circuitdiff.validate import TIMINGS

        artifacts.record_timings(run, path, {k: result.meta[k] for k in TIMINGS if k in result.meta})
    log(f"validate {role} {dataset} alpha={alpha}: wrote {path} and {layout.validation_figure(path)}: "
        f"{summary_line(result)}")
    return result


def stage(ctx) -> None:
    v = ctx.config.validation
    alpha = v.alpha if v.alpha is not None else ctx.config.alphas[0]
    for ds in ctx.dataset(v.dataset):
        for role in sorted(v.roles, key=lambda r: not ctx.models.holds(r)):  # the model in memory first: a load fewer
            validate_one(ctx.run, role, ds.key, alpha, v, get_model=lambda r=role: ctx.models.get(r),
                         dtype=ctx.config.dtype, device=ctx.config.device, progress=ctx.progress, log=ctx.log)
