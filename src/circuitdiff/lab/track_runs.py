"""The run directories of a track: the registry of training runs, each checkpoint's run dir and config,
the files shared between run dirs, and a checkpoint's metrics (lab/track.py drives them)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

from circuitdiff import io
from circuitdiff.errors import UserError
from circuitdiff.lab.settings import TrackSettings
from circuitdiff.store import layout
from circuitdiff.store.keys import read_key, settings_key, write_key

TRACK_SCALES = ("raw", "unit")


@dataclass(frozen=True)
class Checkpoint:
    label: str  # the training run's label in the track
    info: dict  # its registry entry
    step: int
    path: Path  # the adapter dir
    start: Path  # the start's run dir
    run: Path  # this checkpoint's run dir

    @property
    def name(self) -> str:
        return f"{self.label}/checkpoint-{self.step}"


# ---------------------------------------------------------------------- OUT/track.json
def lock(out: Path):
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


def read_registry(out: Path, settings: TrackSettings) -> dict:
    path = layout.track_registry(out)
    wanted = settings.result_settings()
    if not path.exists():
        return {"settings": wanted, "runs": {}}
    registry = io.read_json(path)
    held = registry.get("settings", {})
    changed = sorted(k for k in set(wanted) | set(held) if held.get(k) != _plain(wanted.get(k)))
    if changed:
        raise UserError(f"{out} tracks with other settings (changed: {', '.join(changed)}); "
                        "use another --out, or the same settings")
    return registry


def _plain(value):
    """A settings value as JSON reads it back (tuples are lists)."""
    return list(value) if isinstance(value, tuple) else value


def _train_info(train_dir: Path) -> dict:
    path = layout.train_record(train_dir)
    if not path.exists():
        raise UserError(f"{train_dir} holds no train.json; pass an output dir of `circuitdiff train`")
    s = io.read_json(path)["settings"]
    return {"path": str(train_dir.resolve()), "algorithm": s["algorithm"], "temperature": s["temperature"],
            "shuffle_rewards": s.get("shuffle_rewards", False),
            "base": s["base"], "prompt": s["prompt"], "instruction": s["instruction"],
            "max_completion_length": s["max_completion_length"], "train_data": f"{s['dataset']} {s['split']}"}


def register(registry: dict, train_dir: Path) -> str:
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
def run_config(info: dict, tuned: str, s: TrackSettings, device: str):
    from circuitdiff.config import parse_config

    return parse_config({
        "name": "track", "base": info["base"], "tuned": tuned,
        "datasets": [{"name": s.dataset, "split": s.split, "source": s.source, "limit": s.limit}],
        "alphas": [s.alpha], "n_samples": s.n_samples, "seed": s.seed, "selection": dict(s.selection),
        "granularity": s.granularity, "dtype": s.dtype, "device": device, "objective": list(s.objectives),
        "attn_implementation": s.attn_implementation, "prompt": info["prompt"], "instruction": info["instruction"],
        "max_new_tokens": s.max_new_tokens or info["max_completion_length"],
        "gen_batch_size": s.gen_batch_size, "attr_batch_size": s.attr_batch_size,
        "grading": {"truncated": s.truncated},
    }, "track settings")


def context(config, run: Path, s: TrackSettings, log):
    from circuitdiff.pipeline import RunContext, write_manifest

    ctx = RunContext(config, run, progress=s.progress, log=log)
    ctx.run.mkdir(parents=True, exist_ok=True)
    write_manifest(ctx)
    return ctx


def start_dir(out: Path, info: dict, s: TrackSettings, device: str):
    """(TRACK/start-{key}, its config): key = the generate stage's key of the starting model's answers."""
    from circuitdiff.stages import generate

    cfg = run_config(info, info["base"], s, device)
    return layout.track_start(out, settings_key(generate.settings(cfg, "base", cfg.datasets[0]))), cfg


def _copy(src: Path, dst: Path) -> None:
    io.write_bytes(dst, src.read_bytes())


def share_base_answers(start: Path, run: Path, ds: str) -> None:
    """Copy the starting model's answers into a checkpoint's run dir (unless it has them already)."""
    for src, dst in ((layout.generations(start, "base", ds), layout.generations(run, "base", ds)),
                     (layout.generations_meta(start, "base", ds), layout.generations_meta(run, "base", ds))):
        if not dst.exists():
            _copy(src, dst)


def write_selection(run: Path, ds: str, alpha: float, selection: dict) -> None:
    """A selection file (and its key) made from the fixed set; rewritten only when it changed."""
    path = layout.selection(run, ds, alpha)
    record = {"fixed_set": selection["fixed_set"], "idx": selection["idx"]}
    key = settings_key(record)
    if path.exists() and read_key(path) == key:
        return
    io.write_json(path, selection)
    write_key(path, key, record)


def share_attribution(start: Path, run: Path, ds: str, alpha: float, objective: str) -> None:
    """Copy the start's W (and key) into a checkpoint's run dir when both read the same selection: the
    attribution stage then finds it up to date (its key checks the inputs and the checksum)."""
    src = layout.attribution(start, "base", ds, alpha, objective=objective)
    dst = layout.attribution(run, "base", ds, alpha, objective=objective)
    same = read_key(layout.selection(start, ds, alpha)) == read_key(layout.selection(run, ds, alpha))
    if same and src.exists() and read_key(src) is not None and read_key(dst) != read_key(src):
        _copy(src, dst)
        _copy(src.with_name(src.name + layout.KEY_SUFFIX), dst.with_name(dst.name + layout.KEY_SUFFIX))


def attribution_keys(run: Path, ds: str, s: TrackSettings) -> dict:
    return {f"{role}/{o}": read_key(layout.attribution(run, role, ds, s.alpha, s.scored_text(), objective=o))
            for role in layout.ROLES for o in s.objectives}


# ---------------------------------------------------------------------- metrics
def metrics(run: Path, s: TrackSettings, ranges: dict | None) -> dict:
    """{metrics: {objective: {scale: {metric: {base, tuned, diff, diff_ci, p_perm}}}}, loss, range, ci_method};
    `ranges`: the fixed raw-scale histogram range per objective (None: shared by each pair)."""
    from circuitdiff.metrics import SCALED_METRICS
    from circuitdiff.report import analyse_run

    out = {"metrics": {}, "loss": {}, "range": {}}
    for objective in s.objectives:
        settings = s.report_settings(tuple(ranges[objective]) if ranges else "shared")
        try:
            results, _, _ = analyse_run(run, settings)
        except UserError as err:
            return {"metrics": None, "note": f"no metrics: {err}"}
        (res,) = [r for r in results if math.isclose(r.alpha_value, s.alpha) and (r.objective, r.text) == (objective, s.scored_text() or "own")]
        per_scale = {}
        for scale in TRACK_SCALES:
            per_scale[scale] = {}
            for metric in SCALED_METRICS[scale]:
                c = res.comparisons[(s.entries, scale, metric)]
                per_scale[scale][metric] = {"base": c.base, "tuned": c.tuned, "diff": c.diff,
                                            "diff_ci": list(c.diff_ci), "p_perm": c.p_perm}
        out["metrics"][objective] = per_scale
        out["loss"][objective] = res.loss_label
        (lo, hi), _, mode = res.ranges[(s.entries, "raw")]
        out["range"][objective] = f"[{lo:.6g}, {hi:.6g}] {'fixed for the track' if mode == 'fixed' else 'shared by the pair'}"
        out["n_samples"] = res.n_samples
        out["ci_method"] = settings.ci_method
    return out


def dataset_name(s: TrackSettings) -> str:
    from circuitdiff.data import dataset_spec

    return dataset_spec(s.dataset).name


def dataset_key(s: TrackSettings) -> str:
    return layout.dataset_key(dataset_name(s), s.split)
