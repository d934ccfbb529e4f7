"""`circuitdiff track`: accuracy and circuit-metric changes of every checkpoint of a training run.

For each training output dir (`circuitdiff train`; its train.json names the base spec, prompt
preset, instruction, algorithm and temperature) and each checkpoint in it, track evaluates
(the paper's appendix B; docs/lab.md):
- test accuracy: greedy answers on the held-out split (default ``test``), graded like
  everywhere else, with a 95% Wilson interval;
- the circuit metrics of the checkpoint MINUS those of the starting model, with paired
  bootstrap 95% CIs, for each objective (nll, logit) and scale (raw, unit).

By default the questions are a FIXED set (lab/question_set.py): chosen once from the start and
every checkpoint, with one T_cut and, per objective, one raw-scale histogram range, so that a
trajectory is a paired comparison from step to step; `question_set="per-checkpoint"` re-runs
the selection for each checkpoint instead (the older behaviour).

It reuses the pipeline: each checkpoint gets a run directory with base = the starting model and
tuned = the checkpoint, filled by the pipeline's stages; `circuitdiff.report.analyse_run` gives
the differences. The track directory's layout is in store/layout.py. Step 0 is the starting
model itself. A killed track resumes: the stages skip finished work, and each checkpoint's
result is cached under a key made of the stages' keys, the set and the track settings.
"""

from __future__ import annotations

import time
from pathlib import Path

from circuitdiff import io
from circuitdiff.errors import UserError
from circuitdiff.lab import question_set as QS
from circuitdiff.lab.settings import TrackSettings
from circuitdiff.lab.track_outputs import describe, write_outputs
from circuitdiff.lab.track_runs import (Checkpoint, attribution_keys, context, dataset_key, dataset_name, lock,
                                        metrics, read_registry, register, run_config, share_attribution,
                                        share_base_answers, start_dir, write_selection)
from circuitdiff.store import layout
from circuitdiff.store.keys import read_key, settings_key

__all__ = ["TrackSettings", "track"]


def _start(out: Path, info: dict, s: TrackSettings, device: str, log) -> Path:
    """The starting model's greedy answers, generated once (tuned = itself, copied)."""
    from circuitdiff.pipeline import run_stages

    start, cfg = start_dir(out, info, s, device)
    run_stages(context(cfg, start, s, log), until="grade")
    return start


def _answers(c: Checkpoint, s: TrackSettings, device: str, log) -> None:
    """Generate and grade the checkpoint's answers in its run dir (the start's answers copied in)."""
    from circuitdiff.stages import generate, grade

    c.run.mkdir(parents=True, exist_ok=True)
    share_base_answers(c.start, c.run, dataset_key(s))
    ctx = context(run_config(c.info, str(c.path.resolve()), s, device), c.run, s, log)
    try:
        generate.stage(ctx)
        grade.stage(ctx)
    finally:
        ctx.models.release()


def _rows(run: Path, role: str, s: TrackSettings) -> list[dict]:
    from circuitdiff.store.artifacts import read_generations

    return read_generations(run, role, dataset_key(s))


def _fixed_set(start: Path, checkpoints: list[Checkpoint], s: TrackSettings, rechoose: bool, log) -> dict:
    """The start's fixed question set: read, or chosen from the start and `checkpoints` (and written)."""
    from circuitdiff.select import SelectionSettings

    path = layout.track_question_set(start)
    if path.exists() and not rechoose:
        return io.read_json(path)
    sel = SelectionSettings(alpha=s.alpha, n_samples=s.n_samples, seed=s.seed, **s.selection)
    chosen = QS.choose(_rows(start, "base", s), {c.name: _rows(c.run, "tuned", s) for c in checkpoints}, sel, s.text)
    io.write_json(path, chosen)
    log(f"track: fixed question set of {start.name}: {len(chosen['idx'])} questions, T_cut={chosen['T_cut']} "
        f"(chosen from the start and {len(checkpoints)} checkpoint(s); counts {chosen['counts']})")
    return chosen


def _attribute(c: Checkpoint, s: TrackSettings, device: str, qset: dict | None, log) -> str:
    """Selection and W files of one checkpoint's run dir; returns a note ("" when it has metrics)."""
    from circuitdiff.stages import attribute, select

    ds, ctx = dataset_key(s), context(run_config(c.info, str(c.path.resolve()), s, device), c.run, s, log)
    try:
        if qset is None:
            try:
                select.stage(ctx)
            except UserError as err:
                return f"no metrics: {err}"
        else:
            write_selection(c.run, ds, s.alpha, QS.selection_for(qset, _rows(c.run, s.scored_text() or "tuned", s)))
        drawn = len(io.read_json(layout.selection(c.run, ds, s.alpha))["idx"])
        if drawn < s.min_samples:
            return f"no metrics: {_too_few(drawn, s)}"
        dataset = ctx.config.datasets[0]
        for objective in s.objectives:
            if qset is not None:
                share_attribution(c.start, c.run, ds, s.alpha, objective)
            for role in ("tuned", "base"):
                attribute.attribute_one(ctx, role, s.scored_text() or role, dataset, s.alpha, objective)
    finally:
        ctx.models.release()
    return ""


def _too_few(n: int, s: TrackSettings) -> str:
    return f"only {n} question(s) selected; at least {s.min_samples} are needed for the paired statistics"


def _start_attribution(start: Path, info: dict, qset: dict, s: TrackSettings, device: str, log) -> None:
    """The start model's W on the full set, once, in its own run dir (checkpoints with the full set copy it)."""
    from circuitdiff.stages import attribute

    ds = dataset_key(s)
    write_selection(start, ds, s.alpha, QS.selection_for(qset, _rows(start, "base", s)))
    ctx = context(start_dir(start.parent, info, s, device)[1], start, s, log)
    try:
        for objective in s.objectives:
            attribute.attribute_one(ctx, "base", "base", ctx.config.datasets[0], s.alpha, objective)
    finally:
        ctx.models.release()


def _ranges(start: Path, runs: list[Path], qset: dict, s: TrackSettings, rechoose: bool) -> dict:
    """Per objective, the raw-scale histogram range [0, max |W|] over the start's and every checkpoint's W
    (entries mode of the settings): computed once, kept in the set's file."""
    import numpy as np

    from circuitdiff.metrics import select_entries
    from circuitdiff.store.artifacts import Attribution

    if qset.get("ranges") and not rechoose:
        return qset["ranges"]
    ds, ranges = dataset_key(s), {}
    for objective in s.objectives:
        files = [layout.attribution(start, "base", ds, s.alpha, objective=objective)]
        files += [layout.attribution(r, "tuned", ds, s.alpha, s.scored_text(), objective=objective) for r in runs]
        hi = 0.0
        for f in files:
            if f.exists():
                a = Attribution.load(f)
                hi = max(hi, float(np.abs(select_entries(a.scores, a.edge_mask, s.entries)).max()))
        ranges[objective] = [0.0, hi]
    qset["ranges"] = ranges
    io.write_json(layout.track_question_set(start), qset)
    return ranges


def _result(c: Checkpoint, s: TrackSettings, note: str, qset: dict | None) -> dict:
    """The checkpoint's numbers, cached under the key of everything they depend on."""
    ds = dataset_key(s)
    meta = io.read_json(layout.generations_meta(c.run, "tuned", ds))
    sel_path = layout.selection(c.run, ds, s.alpha)
    parts = {"settings": s.result_settings(), "accuracy": meta.get("accuracy"), "generation": meta.get("key"),
             "note": note, "selection": read_key(sel_path) if sel_path.exists() else None,
             "attribution": attribution_keys(c.run, ds, s), "ranges": (qset or {}).get("ranges")}
    key = settings_key(parts)
    cached = layout.track_result(c.run)
    if cached.exists() and io.read_json(cached).get("key") == key:
        return io.read_json(cached)
    result = {"key": key, "run": c.label, "step": c.step, "checkpoint": str(c.path.resolve()),
              "accuracy": meta["accuracy"], "metrics": None, "note": note, "n_samples": 0,
              "question_set": s.question_set}
    if sel_path.exists():
        sel = io.read_json(sel_path)
        result["n_samples"] = len(sel["idx"])
        if qset is not None:
            result.update({"n_set": len(qset["idx"]), "n_set_correct": QS.n_correct(qset, _rows(c.run, "tuned", s)),
                           "note": "; ".join(x for x in (note, sel.get("note", "")) if x)})
    if not note:
        result.update(metrics(c.run, s, (qset or {}).get("ranges")))
    io.write_json(cached, result)
    return result


# ---------------------------------------------------------------------- track
def track(train_dirs: list[str | Path], settings: TrackSettings, out: str | Path | None = None,
          steps: list[int] | None = None, rechoose: bool = False, log=print) -> Path:
    """Evaluate every checkpoint of every training run into OUT; returns OUT/track.csv.

    `steps`: evaluate only these checkpoint steps (the callback passes the one just saved); the csv
    always holds every checkpoint evaluated so far in OUT. `rechoose`: choose the fixed question set
    again from the start and every checkpoint in OUT (else the set chosen first is kept).
    """
    from circuitdiff.models import resolve_device

    train_dirs = [Path(d) for d in train_dirs]
    if not train_dirs:
        raise UserError("track needs at least one training output dir")
    if out is None:
        if len(train_dirs) > 1:
            raise UserError("several training runs: pass --out (the directory that holds their comparison)")
        out = layout.default_track_dir(train_dirs[0])
    out, device, s = Path(out), resolve_device(settings.device), settings
    with lock(out):
        registry = read_registry(out, s)
        if rechoose:  # a new set changes every checkpoint's numbers: evaluate every registered run again
            held = [Path(info["path"]) for info in registry["runs"].values() if Path(info["path"]).exists()]
            train_dirs += [d for d in held if d.resolve() not in {t.resolve() for t in train_dirs}]
        labels = [register(registry, d) for d in train_dirs]
        io.write_json(layout.track_registry(out), registry)
        todo: list[Checkpoint] = []
        for label, train_dir in zip(labels, train_dirs):
            info = registry["runs"][label]
            if info["train_data"] == f"{dataset_name(s)} {s.split}" and s.source is None:
                raise UserError(f"{train_dir} was trained on {info['train_data']}; track on another split "
                                "(the held-out test split)")
            found = [(st, p) for st, p in layout.find_checkpoints(train_dir) if steps is None or st in steps]
            if not found and steps is None:
                log(f"track {label}: no checkpoint-*/ in {train_dir} yet")
            start = _start(out, info, s, device, log) if found or steps is None else None
            todo += [Checkpoint(label, info, st, p, start, layout.track_checkpoint(out, label, st)) for st, p in found]
        t0 = {c.name: time.time() for c in todo}
        for c in todo:
            _answers(c, s, device, log)
        for start in dict.fromkeys(c.start for c in todo):
            mine = [c for c in todo if c.start == start]
            qset, failed = None, ""
            if s.question_set == "fixed":
                try:
                    qset = _fixed_set(start, _all_checkpoints(out, registry, start, s, device), s, rechoose, log)
                except UserError as err:
                    failed = f"no metrics: {err}"
                if qset is not None and len(qset["idx"]) < s.min_samples:
                    failed = f"no metrics: {_too_few(len(qset['idx']), s)}"
                if not failed:
                    _start_attribution(start, mine[0].info, qset, s, device, log)
            notes = {c.name: failed or _attribute(c, s, device, qset, log) for c in mine}
            if qset is not None and not failed:
                _ranges(start, [c.run for c in _all_checkpoints(out, registry, start, s, device)], qset, s, rechoose)
            for c in mine:
                log(describe(c.label, _result(c, s, notes[c.name], qset), s, time.time() - t0[c.name]))
        starts = {label: start_dir(out, info, s, device)[0] for label, info in registry["runs"].items()}
        write_outputs(out, registry, s, dataset_key(s), starts)
    log(f"track: wrote {layout.track_csv(out)} and {layout.track_figure(out)}")
    return layout.track_csv(out)


def _all_checkpoints(out: Path, registry: dict, start: Path, s: TrackSettings, device: str) -> list[Checkpoint]:
    """Every checkpoint in OUT with answers, from the runs that share `start`."""
    found = []
    for label, info in registry["runs"].items():
        if start_dir(out, info, s, device)[0] != start:
            continue
        for step, run in layout.find_track_checkpoints(out, label):
            if layout.generations_meta(run, "tuned", dataset_key(s)).exists():
                found.append(Checkpoint(label, info, step, layout.train_checkpoint(Path(info["path"]), step), start, run))
    return found
