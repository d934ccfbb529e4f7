"""`circuitdiff track`: accuracy and circuit-metric changes of every checkpoint of a training run.

For each training output dir (`circuitdiff train`; its train.json names the base spec, prompt
preset, instruction, algorithm and temperature) and each checkpoint in it, track evaluates
(method.md section 8, the paper's appendix B):
- test accuracy: greedy answers on the held-out split (default ``test``), graded like
  everywhere else, with a 95% Wilson interval;
- the three circuit metrics (Activation Intensity, Information Complexity, Distribution
  Kurtosis) of the checkpoint MINUS those of the starting model, with paired bootstrap 95% CIs.

It reuses the pipeline: each checkpoint gets a `circuitdiff run` directory with base = the
starting model and tuned = the checkpoint; `circuitdiff.report.analyse_run` gives the
differences. Layout of OUT:

    OUT/track.json                        the settings and the registered training runs
    OUT/track.csv, OUT/track.png          rebuilt (atomically) from the directories below
    OUT/start-{key}/                      run dir of the starting model paired with itself:
                                          its greedy answers (generated once) and the step-0 accuracy
    OUT/runs/{run}/checkpoint-{step}/     run dir: base = the starting model (answers copied from
                                          start-{key}), tuned = the checkpoint
    OUT/runs/{run}/checkpoint-{step}/track_result.json   the checkpoint's numbers, keyed by its inputs

Step 0 is the starting model itself: its accuracy, and a difference of 0 by definition.
A killed track resumes: the run stages skip finished work, and each checkpoint's analysis is
cached under the key of the files it read. A checkpoint with fewer than `min_samples`
selected questions (too few both-correct, or every one cut by the length filters) gets its
accuracy and NaN metrics with the reason in ``note``; the track goes on.

`TrackCallback` runs the same evaluation during training (on every save), into the same OUT.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from circuitdiff import io, rundir
from circuitdiff.errors import UserError

TRACK_METRICS = ("activation_intensity", "information_complexity", "distribution_kurtosis")
CSV_COLUMNS = [
    "run", "algorithm", "temperature", "step", "accuracy", "acc_ci_low", "acc_ci_high", "correct", "total",
    "metric", "diff", "diff_ci_low", "diff_ci_high", "base", "tuned", "p_perm",
    "entries", "bins", "range", "log_base", "alpha", "n_samples", "n_requested", "loss", "ci_method",
    "dataset", "checkpoint", "note",
]  # fmt: skip
# settings that change a number; the others (device, batch sizes, progress) may differ between calls
RESULT_FIELDS = ("dataset", "split", "source", "limit", "alpha", "n_samples", "seed", "max_new_tokens", "dtype",
                 "attn_implementation", "granularity", "entries", "bins", "log_base", "eps", "n_boot", "n_perm",
                 "min_samples", "selection")


@dataclass
class TrackSettings:
    dataset: str = "arith"
    split: str = "test"
    source: str | None = None  # None: the dataset's offline/generated source; else a file path or 'hub'
    limit: int | None = None  # the first n test problems
    alpha: float = 0.1
    n_samples: int = 100  # N: questions drawn per checkpoint (the same for base and checkpoint)
    seed: int = 0
    max_new_tokens: int | None = None  # None: the training run's max_completion_length
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    granularity: str = "block"
    entries: str = "all"  # "all" (dense, paper-compatible) or "edges"
    bins: int = 100
    log_base: str = "e"
    eps: float = 1e-12
    n_boot: int = 10000
    n_perm: int = 1000
    min_samples: int = 2  # fewer selected questions: metrics NaN (a pair needs >= 2 for its statistics)
    selection: dict = field(default_factory=dict)  # beta/gamma/delta/length_rule/cut_rule overrides
    device: str = "auto"
    gen_batch_size: int = 16
    attr_batch_size: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        from circuitdiff.metrics import ENTRIES

        if self.entries not in ENTRIES:
            raise UserError(f"entries {self.entries!r} is unknown; use one of {', '.join(ENTRIES)}")
        if not 0 < self.alpha <= 1:
            raise UserError(f"alpha={self.alpha} must lie in (0, 1]")
        if self.min_samples < 2:
            raise UserError("min_samples must be at least 2 (the paired statistics need two questions)")
        self.report_settings()  # validates bins, log base, n_boot, n_perm

    def result_settings(self) -> dict:
        data = asdict(self)
        return {k: data[k] for k in RESULT_FIELDS}

    def report_settings(self):
        from circuitdiff.report import Settings

        try:
            return Settings(entries=(self.entries,), bins=self.bins, log_base=self.log_base, eps=self.eps,
                            n_boot=self.n_boot, n_perm=self.n_perm, seed=self.seed)
        except ValueError as err:
            raise UserError(f"track settings: {err}") from None


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
        with open(out / ".track.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return held()


def _read_registry(out: Path, settings: TrackSettings) -> dict:
    path = out / "track.json"
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
    path = train_dir / "train.json"
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
    }, "track settings")


def _start_key(info: dict, s: TrackSettings) -> str:
    from circuitdiff.run import settings_key

    return settings_key({"base": info["base"], "prompt": info["prompt"], "instruction": info["instruction"],
                         "max_new_tokens": s.max_new_tokens or info["max_completion_length"], "dtype": s.dtype,
                         "attn_implementation": s.attn_implementation, "dataset": s.dataset, "split": s.split,
                         "source": s.source, "limit": s.limit})


def _dataset_name(s: TrackSettings) -> str:
    from circuitdiff.data import dataset_spec

    return dataset_spec(s.dataset).name


def _dataset_key(s: TrackSettings) -> str:
    return rundir.dataset_key(_dataset_name(s), s.split)


def _start(out: Path, info: dict, s: TrackSettings, device: str, log) -> Path:
    """OUT/start-{key}: the starting model's greedy answers, generated once (tuned = itself, copied)."""
    from circuitdiff.run import Runner

    start = out / f"start-{_start_key(info, s)}"
    cfg = _run_config(info, info["base"], s, device)
    Runner(cfg, start, progress=s.progress, log=log)(until="grade")
    return start


def _share_base(start: Path, run: Path, ds: str) -> None:
    """Copy the starting model's answers into a checkpoint's run dir (unless it has them already)."""
    for src, dst in ((rundir.generations(start, "base", ds), rundir.generations(run, "base", ds)),
                     (rundir.generations_meta(start, "base", ds), rundir.generations_meta(run, "base", ds))):
        if not dst.exists():
            io.write_bytes(dst, src.read_bytes())


def _accuracy(run: Path, role: str, ds: str) -> dict:
    return io.read_json(rundir.generations_meta(run, role, ds))["accuracy"]


def _result_key(run: Path, ds: str, s: TrackSettings) -> str:
    from circuitdiff.run import settings_key

    parts: dict = {"settings": s.result_settings()}
    for role in rundir.ROLES:
        meta = io.read_json(rundir.generations_meta(run, role, ds))
        parts[role] = [meta.get("key"), meta.get("accuracy")]
        attr_meta = rundir.attribution_meta(run, role, ds, s.alpha)
        parts[f"attr_{role}"] = io.read_json(attr_meta).get("key") if attr_meta.exists() else None
    sel = rundir.selection(run, ds, s.alpha)
    parts["selection"] = io.read_json(sel).get("key") if sel.exists() else None
    return settings_key(parts)


def _evaluate(out: Path, label: str, info: dict, step: int, checkpoint: Path, start: Path,
              s: TrackSettings, device: str, log) -> dict:
    """Run the pipeline for (start, checkpoint) and return the checkpoint's result (cached by key)."""
    from circuitdiff.run import Runner

    ds = _dataset_key(s)
    run = out / "runs" / label / f"checkpoint-{step}"
    run.mkdir(parents=True, exist_ok=True)
    _share_base(start, run, ds)
    runner = Runner(_run_config(info, str(checkpoint.resolve()), s, device), run, progress=s.progress, log=log)
    runner.write_manifest()
    note, selected = "", False
    try:
        for role in rundir.ROLES:
            runner.generate(role)
        for role in rundir.ROLES:
            runner.grade(role)
        try:
            runner.select()
            selected = True
        except UserError as err:
            note = f"no metrics: {err}"
        if not note:
            drawn = len(io.read_json(rundir.selection(run, ds, s.alpha))["idx"])
            if drawn < s.min_samples:
                note = (f"no metrics: only {drawn} question(s) selected (both correct and passing the length "
                        f"filters); at least {s.min_samples} are needed")
            else:
                for role in ("tuned", "base"):  # tuned first: it is the model still loaded
                    runner.attribute(role)
    finally:
        runner.models.release()

    key = _result_key(run, ds, s)
    cached = run / "track_result.json"
    if cached.exists():
        old = io.read_json(cached)
        if old.get("key") == key:
            return old
    result = {"key": key, "run": label, "step": step, "checkpoint": str(checkpoint.resolve()),
              "accuracy": _accuracy(run, "tuned", ds), "metrics": None, "note": note,
              "n_both_correct": None, "n_samples": 0}
    sel_path = rundir.selection(run, ds, s.alpha)
    if selected:  # (a failed selection may leave an older file behind)
        sel = io.read_json(sel_path)
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
    (res,) = [r for r in results if math.isclose(r.alpha_value, s.alpha)]
    metrics = {}
    for metric in TRACK_METRICS:
        c = res.comparisons[(s.entries, metric)]
        metrics[metric] = {"base": c.base, "tuned": c.tuned, "diff": c.diff, "diff_ci": list(c.diff_ci),
                           "p_perm": c.p_perm}
    lo, hi = res.ranges[s.entries]
    return {"metrics": metrics, "loss": res.loss_label, "n_samples": res.n_samples,
            "range": f"[{lo:.6g}, {hi:.6g}] shared by the pair", "ci_method": settings.ci_method}


# ---------------------------------------------------------------------- csv + figure

def _rows(out: Path, registry: dict, s: TrackSettings) -> list[dict]:
    ds = _dataset_key(s)
    rows = []
    for label, info in registry["runs"].items():
        common = {"run": label, "algorithm": info["algorithm"], "temperature": info["temperature"],
                  "entries": s.entries, "bins": s.bins, "log_base": s.log_base, "alpha": s.alpha,
                  "n_requested": s.n_samples, "dataset": ds}
        start = out / f"start-{_start_key(info, s)}"
        if rundir.generations_meta(start, "base", ds).exists():
            acc = _accuracy(start, "base", ds)
            for metric in TRACK_METRICS:
                rows.append({**common, **_acc_cols(acc), "step": 0, "metric": metric, "diff": 0.0,
                             "diff_ci_low": 0.0, "diff_ci_high": 0.0, "checkpoint": info["base"],
                             "note": "the starting model: difference 0 by definition"})
        results = []
        for path in (out / "runs" / label).glob("checkpoint-*/track_result.json"):
            results.append(io.read_json(path))
        for r in sorted(results, key=lambda r: r["step"]):
            for metric in TRACK_METRICS:
                m = (r.get("metrics") or {}).get(metric)
                nan = float("nan")
                rows.append({**common, **_acc_cols(r["accuracy"]), "step": r["step"], "metric": metric,
                             "diff": m["diff"] if m else nan, "diff_ci_low": m["diff_ci"][0] if m else nan,
                             "diff_ci_high": m["diff_ci"][1] if m else nan, "base": m["base"] if m else nan,
                             "tuned": m["tuned"] if m else nan, "p_perm": m["p_perm"] if m else nan,
                             "range": r.get("range", ""), "n_samples": r.get("n_samples", 0),
                             "loss": r.get("loss", ""), "ci_method": r.get("ci_method", ""),
                             "checkpoint": r["checkpoint"], "note": r.get("note", "")})
    return rows


def _acc_cols(acc: dict) -> dict:
    return {"accuracy": acc["accuracy"], "acc_ci_low": acc["ci_low"], "acc_ci_high": acc["ci_high"],
            "correct": acc["correct"], "total": acc["total"]}


def write_outputs(out: Path, registry: dict, s: TrackSettings) -> Path:
    from circuitdiff.report.tables import to_csv

    rows = _rows(out, registry, s)
    io.write_text(out / "track.csv", to_csv(rows, CSV_COLUMNS))
    io.write_bytes(out / "track.png", figure(rows, s))
    return out / "track.csv"


def figure(rows: list[dict], s: TrackSettings) -> bytes:
    """Accuracy and each metric difference vs step, one line per training run, 95% CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from circuitdiff.metrics import METRIC_LABELS
    from circuitdiff.report.figures import to_png

    panels = [("accuracy", "Test accuracy")] + [(m, f"Δ {METRIC_LABELS[m]} (checkpoint − start)") for m in TRACK_METRICS]
    fig, grid = plt.subplots(2, 2, figsize=(9.5, 7.0))
    axes = list(grid.ravel())
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        first = mine[0]
        name = f"{run} ({first['algorithm']}, T={first['temperature']:g})"
        color = colors[k % len(colors)]
        for ax, (key, _) in zip(axes, panels):
            if key == "accuracy":
                pts = [r for r in mine if r["metric"] == TRACK_METRICS[0]]
                y, lo, hi = ("accuracy", "acc_ci_low", "acc_ci_high")
            else:
                pts = [r for r in mine if r["metric"] == key]
                y, lo, hi = ("diff", "diff_ci_low", "diff_ci_high")
            x = np.array([r["step"] for r in pts], dtype=float)
            v = np.array([r[y] for r in pts], dtype=float)
            ax.plot(x, v, "o-", color=color, label=name, ms=4)
            ax.fill_between(x, [r[lo] for r in pts], [r[hi] for r in pts], color=color, alpha=0.2, lw=0)
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key != "accuracy":
            ax.axhline(0.0, color="0.5", lw=0.8)
    if runs:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{s.dataset} {s.split}: greedy accuracy (95% Wilson CI)\nmetric differences at alpha={s.alpha} "
                 f"(entries={s.entries}, {s.bins} bins, paired bootstrap 95% CI)", fontsize=9)
    fig.tight_layout()
    return to_png(fig)


# ---------------------------------------------------------------------- track

def track(train_dirs: list[str | Path], settings: TrackSettings, out: str | Path | None = None,
          steps: list[int] | None = None, log=print) -> Path:
    """Evaluate every checkpoint of every training run into OUT; returns OUT/track.csv.

    `steps`: evaluate only these checkpoint steps (the callback passes the one just saved);
    the csv always holds every checkpoint evaluated so far in OUT.
    """
    from circuitdiff.lab.train import checkpoints, resolve_device

    train_dirs = [Path(d) for d in train_dirs]
    if not train_dirs:
        raise UserError("track needs at least one training output dir")
    if out is None:
        if len(train_dirs) > 1:
            raise UserError("several training runs: pass --out (the directory that holds their comparison)")
        out = train_dirs[0] / "track"
    out = Path(out)
    device = resolve_device(settings.device)
    with _lock(out):
        registry = _read_registry(out, settings)
        labels = [_register(registry, d) for d in train_dirs]
        io.write_json(out / "track.json", registry)
        for label, train_dir in zip(labels, train_dirs):
            info = registry["runs"][label]
            if info["train_data"] == f"{_dataset_name(settings)} {settings.split}" and settings.source is None:
                raise UserError(f"{train_dir} was trained on {info['train_data']}; track on another split "
                                "(the held-out test split)")
            found = [(st, p) for st, p in checkpoints(train_dir) if steps is None or st in steps]
            if not found and steps is None:
                log(f"track {label}: no checkpoint-*/ in {train_dir} yet")
            start = _start(out, info, settings, device, log) if found or steps is None else None
            for step, path in found:
                t0 = time.time()
                r = _evaluate(out, label, info, step, path, start, settings, device, log)
                log(_describe(label, r, settings, time.time() - t0))
            write_outputs(out, registry, settings)
    log(f"track: wrote {out / 'track.csv'} and {out / 'track.png'}")
    return out / "track.csv"


def _describe(label: str, r: dict, s: TrackSettings, seconds: float) -> str:
    acc = r["accuracy"]
    text = f"track {label} step {r['step']}: accuracy {acc['accuracy']:.1%} ({acc['correct']}/{acc['total']})"
    if r.get("metrics"):
        text += "; " + ", ".join(f"Δ{m.split('_')[1][:4]} {r['metrics'][m]['diff']:+.3g}" for m in TRACK_METRICS)
        text += f" (n={r['n_samples']}, alpha={s.alpha})"
    else:
        text += f"; {r['note']}"
    return text + f" [{seconds:.0f}s]"


# ---------------------------------------------------------------------- callback

def _rng_state():
    import torch

    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    return state


def _set_rng_state(state) -> None:
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.random.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a dependency
    _CallbackBase = object


class TrackCallback(_CallbackBase):
    """Track each checkpoint as soon as the trainer saves it (the same evaluation as `circuitdiff track`).

    Writes into `out` (default: the trainer's output_dir/track), rebuilding track.csv/png. The
    random states (python, numpy, torch, cuda) are restored after each evaluation, so tracking
    does not change the training run. Only the main process evaluates. A UserError in the
    evaluation is logged and training goes on (`circuitdiff track` can redo that checkpoint).
    """

    def __init__(self, settings: TrackSettings | None = None, out: str | Path | None = None, log=print, **kwargs):
        self.settings = settings or TrackSettings(**kwargs)
        self.out = out
        self.log = log

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        train_dir = Path(args.output_dir)
        out = Path(self.out) if self.out is not None else train_dir / "track"
        rng = _rng_state()
        try:
            track([train_dir], self.settings, out, steps=[state.global_step], log=self.log)
        except UserError as err:
            self.log(f"track: checkpoint-{state.global_step} not tracked: {err}")
        finally:
            _set_rng_state(rng)


# ---------------------------------------------------------------------- CLI

def register_cli(subparsers) -> None:
    d = TrackSettings()
    p = subparsers.add_parser(
        "track",
        help="test accuracy and circuit-metric changes (checkpoint - start) of every training checkpoint",
        description="For every checkpoint of each TRAIN_DIR (`circuitdiff train` output): greedy test accuracy "
                    "with a 95% CI, and Activation Intensity, Information Complexity and Distribution Kurtosis "
                    "of the checkpoint minus the starting model with paired bootstrap CIs. Writes OUT/track.csv "
                    "and OUT/track.png; a rerun resumes.",
    )
    p.add_argument("train_dirs", nargs="+", metavar="TRAIN_DIR")
    p.add_argument("--dataset", required=True, help="evaluation problems (arith, gsm8k, ...)")
    p.add_argument("--split", default=d.split, help="held-out split (default test)")
    p.add_argument("--source", help="dataset file (or 'hub') instead of the default source")
    p.add_argument("--limit", type=int, help="the first n problems")
    p.add_argument("--alpha", type=float, default=d.alpha, help="T_cut = alpha * T_bar (default 0.1)")
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="N questions drawn per checkpoint (default 100)")
    p.add_argument("--max-new-tokens", type=int, help="default: the training run's max_completion_length")
    p.add_argument("--entries", choices=["all", "edges"], default=d.entries)
    p.add_argument("--bins", type=int, default=d.bins)
    p.add_argument("--n-boot", type=int, default=d.n_boot)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--device", default=d.device)
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    p.add_argument("--out", help="output dir (default TRAIN_DIR/track for one run; required for several)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    settings = TrackSettings(dataset=args.dataset, split=args.split, source=args.source, limit=args.limit,
                             alpha=args.alpha, n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
                             entries=args.entries, bins=args.bins, n_boot=args.n_boot, seed=args.seed,
                             dtype=args.dtype, device=args.device, gen_batch_size=args.gen_batch_size,
                             progress=True)
    track(args.train_dirs, settings, args.out)
    return 0


__all__ = ["TrackCallback", "TrackSettings", "figure", "track", "write_outputs"]
