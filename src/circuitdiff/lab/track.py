"""`circuitdiff track`: accuracy and circuit-metric changes of every checkpoint of a training run.

For each training output dir (`circuitdiff train`; its train.json names the base spec, prompt
preset, instruction, algorithm and temperature) and each checkpoint in it, track evaluates
(the paper's appendix B; docs/lab.md):
- test accuracy: greedy answers on the held-out split (default ``test``), graded like
  everywhere else, with a 95% Wilson interval;
- the three circuit metrics (Activation Intensity, Information Complexity, Distribution
  Kurtosis) of the checkpoint MINUS those of the starting model, with paired bootstrap 95% CIs.

It reuses the pipeline: each checkpoint gets a run directory with base = the starting model and
tuned = the checkpoint, filled by the pipeline's stages; `circuitdiff.report.analyse_run` gives
the differences. The track directory's layout is in store/layout.py. Step 0 is the starting
model itself: its accuracy, and a difference of 0 by definition. A killed track resumes: the
stages skip finished work, and each checkpoint's analysis is cached under a key made of the
stages' keys and the track settings. A checkpoint with fewer than `min_samples` selected
questions gets its accuracy and NaN metrics with the reason in ``note``; the track goes on.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from circuitdiff import io
from circuitdiff.errors import UserError
from circuitdiff.lab.settings import TrackSettings
from circuitdiff.lab.track_outputs import TRACK_METRICS, describe, write_outputs
from circuitdiff.store import layout
from circuitdiff.store.keys import read_key, settings_key

__all__ = ["TrackSettings", "track"]


# ---------------------------------------------------------------------- OUT/track.json
def _lock(out: Path):
    """An exclusive lock on OUT while it is written (two trainings may track into one OUT)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux/macOS
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held():
        out.mkdir(parents=True, exist_ok=True)
        with open(layout.track_lock(out), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return held()


def _read_registry(out: Path, settings: TrackSettings) -> dict:
    path = layout.track_registry(out)
    wanted = settings.result_settings()
    if not path.exists():
        return {"settings": wanted, "runs": {}}
    registry = io.read_json(path)
    held = registry.get("settings", {})
    changed = sorted(k for k in set(wanted) | set(held) if held.get(k) != wanted.get(k))
    if changed:
        raise UserError(f"{out} tracks with other settings (changed: {', '.join(changed)}); "
                        "use another --out, or the same settings")
    return registry


def _train_info(train_dir: Path) -> dict:
    path = layout.train_record(train_dir)
    if not path.exists():
        raise UserError(f"{train_dir} holds no train.json; pass an output dir of `circuitdiff train`")
    s = io.read_json(path)["settings"]
    return {"path": str(train_dir.resolve()), "algorithm": s["algorithm"], "temperature": s["temperature"],
            "base": s["base"], "prompt": s["prompt"], "instruction": s["instruction"],
            "max_completion_length": s["max_completion_length"], "train_data": f"{s['dataset']} {s['split']}"}


def _register(registry: dict, train_dir: Path) -> str:
    """The label of a training run in OUT (its dir name; '-2', '-3' ... when another run has it)."""
    info = _train_info(train_dir)
    for label, held in registry["runs"].items():
        if held["path"] == info["path"]:
            registry["runs"][label] = info
            return label
    label, n = train_dir.resolve().name, 1
    while label in registry["runs"]:
        n += 1
        label = f"{train_dir.resolve().name}-{n}"
    registry["runs"][label] = info
    return label


# ---------------------------------------------------------------------- run dirs
def _run_config(info: dict, tuned: str, s: TrackSettings, device: str):
    from circuitdiff.config import parse_config

    return parse_config({
        "name": "track", "base": info["base"], "tuned": tuned,
        "datasets": [{"name": s.dataset, "split": s.split, "source": s.source, "limit": s.limit}],
        "alphas": [s.alpha], "n_samples": s.n_samples, "seed": s.seed, "selection": dict(s.selection),
        "granularity": s.granularity, "dtype": s.dtype, "device": device,
        "attn_implementation": s.attn_implementation, "prompt": info["prompt"], "instruction": info["instruction"],
        "max_new_tokens": s.max_new_tokens or info["max_completion_length"],
        "gen_batch_size": s.gen_batch_size, "attr_batch_size": s.attr_batch_size,
        "grading": {"truncated": s.truncated},
    }, "track settings")


def _context(config, run: Path, s: TrackSettings, log):
    from circuitdiff.pipeline import RunContext, write_manifest

    ctx = RunContext(config, run, progress=s.progress, log=log)
    ctx.run.mkdir(parents=True, exist_ok=True)
    write_manifest(ctx)
    return ctx


def _start_dir(out: Path, info: dict, s: TrackSettings, device: str):
    """(TRACK/start-{key}, its config): key = the generate stage's key of the starting model's answers."""
    from circuitdiff.stages import generate

    cfg = _run_config(info, info["base"], s, device)
    return layout.track_start(out, settings_key(generate.settings(cfg, "base", cfg.datasets[0]))), cfg


def _start(out: Path, info: dict, s: TrackSettings, device: str, log) -> Path:
    """The starting model's greedy answers, generated once (tuned = itself, copied)."""
    from circuitdiff.pipeline import run_stages

    start, cfg = _start_dir(out, info, s, device)
    run_stages(_context(cfg, start, s, log), until="grade")
    return start


def _share_base(start: Path, run: Path, ds: str) -> None:
    """Copy the starting model's answers into a checkpoint's run dir (unless it has them already)."""
    for src, dst in ((layout.generations(start, "base", ds), layout.generations(run, "base", ds)),
                     (layout.generations_meta(start, "base", ds), layout.generations_meta(run, "base", ds))):
        if not dst.exists():
            io.write_bytes(dst, src.read_bytes())


def _accuracy(run: Path, role: str, ds: str) -> dict:
    return io.read_json(layout.generations_meta(run, role, ds))["accuracy"]


def _result_key(run: Path, ds: str, s: TrackSettings) -> str:
    """The track settings, the generations' keys and accuracies, and the keys of the selection and W files."""
    parts: dict = {"settings": s.result_settings()}
    for role in layout.ROLES:
        meta = io.read_json(layout.generations_meta(run, role, ds))
        parts[role] = [meta.get("key"), meta.get("accuracy")]
        parts[f"attr_{role}"] = read_key(layout.attribution(run, role, ds, s.alpha))
    parts["selection"] = read_key(layout.selection(run, ds, s.alpha))
    return settings_key(parts)


def _evaluate(out: Path, label: str, info: dict, step: int, checkpoint: Path, start: Path,
              s: TrackSettings, device: str, log) -> dict:
    """Run the stages for (start, checkpoint) and return the checkpoint's result (cached by key)."""
    from circuitdiff.stages import attribute, generate, grade, select

    ds = _dataset_key(s)
    run = layout.track_checkpoint(out, label, step)
    run.mkdir(parents=True, exist_ok=True)
    _share_base(start, run, ds)
    ctx = _context(_run_config(info, str(checkpoint.resolve()), s, device), run, s, log)
    note, selected = "", False
    try:
        generate.stage(ctx)
        grade.stage(ctx)
        try:
            select.stage(ctx)
            selected = True
        except UserError as err:
            note = f"no metrics: {err}"
        if not note:
            drawn = len(io.read_json(layout.selection(run, ds, s.alpha))["idx"])
            if drawn < s.min_samples:
                note = (f"no metrics: only {drawn} question(s) selected (both correct, both finished and passing "
                        f"the length filters); at least {s.min_samples} are needed")
            else:
                attribute.stage(ctx)
    finally:
        ctx.models.release()

    key = _result_key(run, ds, s)
    cached = layout.track_result(run)
    if cached.exists():
        old = io.read_json(cached)
        if old.get("key") == key:
            return old
    result = {"key": key, "run": label, "step": step, "checkpoint": str(checkpoint.resolve()),
              "accuracy": _accuracy(run, "tuned", ds), "metrics": None, "note": note,
              "n_both_correct": None, "n_samples": 0}
    if selected:
        sel = io.read_json(layout.selection(run, ds, s.alpha))
        result["n_both_correct"] = sel["counts"]["both_correct"]
        result["n_samples"] = len(sel["idx"])
    if not note:
        result.update(_metrics(run, s))
    io.write_json(cached, result)
    return result


def _metrics(run: Path, s: TrackSettings) -> dict:
    from circuitdiff.report import analyse_run

    settings = s.report_settings()
    try:
        results, _, _ = analyse_run(run, settings)
    except UserError as err:
        return {"metrics": None, "note": f"no metrics: {err}"}
    (res,) = [r for r in results if math.isclose(r.alpha_value, s.alpha) and (r.objective, r.text) == ("nll", "own")]
    metrics = {}
    for metric in TRACK_METRICS:
        c = res.comparisons[(s.entries, "raw", metric)]
        metrics[metric] = {"base": c.base, "tuned": c.tuned, "diff": c.diff, "diff_ci": list(c.diff_ci),
                           "p_perm": c.p_perm}
    (lo, hi), _, _ = res.ranges[(s.entries, "raw")]
    return {"metrics": metrics, "loss": res.loss_label, "n_samples": res.n_samples,
            "range": f"[{lo:.6g}, {hi:.6g}] shared by the pair", "ci_method": settings.ci_method}


def _dataset_name(s: TrackSettings) -> str:
    from circuitdiff.data import dataset_spec

    return dataset_spec(s.dataset).name


def _dataset_key(s: TrackSettings) -> str:
    return layout.dataset_key(_dataset_name(s), s.split)


# ---------------------------------------------------------------------- track
def track(train_dirs: list[str | Path], settings: TrackSettings, out: str | Path | None = None,
          steps: list[int] | None = None, log=print) -> Path:
    """Evaluate every checkpoint of every training run into OUT; returns OUT/track.csv.

    `steps`: evaluate only these checkpoint steps (the callback passes the one just saved);
    the csv always holds every checkpoint evaluated so far in OUT.
    """
    from circuitdiff.models import resolve_device

    train_dirs = [Path(d) for d in train_dirs]
    if not train_dirs:
        raise UserError("track needs at least one training output dir")
    if out is None:
        if len(train_dirs) > 1:
            raise UserError("several training runs: pass --out (the directory that holds their comparison)")
        out = layout.default_track_dir(train_dirs[0])
    out = Path(out)
    device = resolve_device(settings.device)
    ds = _dataset_key(settings)
    with _lock(out):
        registry = _read_registry(out, settings)
        labels = [_register(registry, d) for d in train_dirs]
        io.write_json(layout.track_registry(out), registry)
        for label, train_dir in zip(labels, train_dirs):
            info = registry["runs"][label]
            if info["train_data"] == f"{_dataset_name(settings)} {settings.split}" and settings.source is None:
                raise UserError(f"{train_dir} was trained on {info['train_data']}; track on another split "
                                "(the held-out test split)")
            found = [(st, p) for st, p in layout.find_checkpoints(train_dir) if steps is None or st in steps]
            if not found and steps is None:
                log(f"track {label}: no checkpoint-*/ in {train_dir} yet")
            start = _start(out, info, settings, device, log) if found or steps is None else None
            for step, path in found:
                t0 = time.time()
                r = _evaluate(out, label, info, step, path, start, settings, device, log)
                log(describe(label, r, settings, time.time() - t0))
        starts = {label: _start_dir(out, info, settings, device)[0] for label, info in registry["runs"].items()}
        write_outputs(out, registry, settings, ds, starts)
    log(f"track: wrote {layout.track_csv(out)} and {layout.track_figure(out)}")
    return layout.track_csv(out)
