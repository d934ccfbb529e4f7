"""Stage `generate`: greedy answers of both models to every question, appended to a JSONL per batch.

Resume: rows are appended per finished batch (flushed, fsynced); a rerun skips every idx already
in the file, and a line cut off by a kill is dropped (the file rewritten atomically) before
appending again. Each row is graded as it is written (`grading.truncated` decides an answer cut
at the cap without a \\boxed{} answer). The settings that shape an answer (`settings`) are hashed into a key kept in
``{dataset}.meta.json``; a rerun with another key refuses to mix answers. When both roles have
the same key (a model paired with itself), the tuned rows are copied from the base rows (greedy
decoding is deterministic). Rows are graded as they are written (circuitdiff.grade).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from circuitdiff.data import Problem
from circuitdiff.decoding import Backend, Generation
from circuitdiff.errors import UserError
from circuitdiff.grade import GRADER_VERSION, grade
from circuitdiff.io import DamagedFile, append_jsonl, read_json, read_jsonl_rows, read_jsonl_tolerant, write_json, write_jsonl
from circuitdiff.prompts import encode, render
from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import settings_key

CONVENTIONS = {
    "decoding": "greedy (no sampling), zero-shot, at most max_new_tokens new tokens, stop at EOS",
    "eos": "the tokenizer's EOS and every id in generation_config.eos_token_id",
    "answer_ids": "generated tokens before EOS (EOS not stored)",
    "batching": "left padding, KV cache, prompts sorted by length (longest first)",
    "self_pair": "when base and tuned share every generation setting, tuned rows are copied from base",
}


def settings(config, role: str, ds) -> dict:
    """What shapes an answer: the key of a role's generations file."""
    return {
        "model": getattr(config, role).spec,
        "prompt": config.prompt_for(role),
        "instruction": config.instruction,
        "max_new_tokens": config.max_new_tokens,
        "dtype": config.dtype,
        "backend": config.backend,
        "attn_implementation": config.attn_implementation,
        "dataset": ds.name,
        "split": ds.split,
        "source": ds.source,
    }


def stage(ctx) -> None:
    for role in layout.ROLES:
        for ds in ctx.config.datasets:
            generate_one(ctx, role, ds)


def generate_one(ctx, role: str, ds) -> None:
    path = layout.generations(ctx.run, role, ds.key)
    meta_path = layout.generations_meta(ctx.run, role, ds.key)
    wanted = settings(ctx.config, role, ds)
    key = settings_key(wanted)
    existing = repair(path, ctx.log)
    try:
        meta = read_json(meta_path) if meta_path.exists() else None
    except DamagedFile:
        raise UserError(f"{meta_path} is damaged, so the answers in {path} cannot be matched to their settings; "
                        "delete both files and run again") from None
    if meta is None and existing:
        raise UserError(f"{path} holds answers but {meta_path} (their settings) is missing; delete {path} and run "
                        "again, or restore the meta file")
    if meta is not None and meta.get("key") != key:
        if existing:
            changed = sorted(k for k in wanted if meta.get("settings", {}).get(k) != wanted[k])
            raise UserError(f"{path} holds answers made with other settings (changed: {', '.join(changed)}); "
                            "use another run directory (--out) or delete that file")
        meta = None
    rule = ctx.config.grading.truncated
    if meta is None:
        write_json(meta_path, {"settings": wanted, "key": key, "grader": GRADER_VERSION, "truncated_rule": rule})
    problems = ctx.problems(ds)
    _check_rows_match(path, existing, problems)
    done = {r["idx"] for r in existing}
    pending = [p for p in problems if p.idx not in done]
    if not pending:
        ctx.log(f"generate {role} {ds.key}: {len(problems)} answers already in {path}")
        return
    if role == "tuned" and key == settings_key(settings(ctx.config, "base", ds)):
        base_rows = {r["idx"]: r for r in artifacts.read_generations(ctx.run, "base", ds.key)}
        if all(p.idx in base_rows for p in pending):
            write_jsonl(path, existing + [base_rows[p.idx] for p in pending])
            ctx.log(f"generate tuned {ds.key}: same model and settings as base; copied {len(pending)} answers")
            return
    cfg = ctx.config
    pool = ctx.pool()
    loaded = ctx.models.get(role) if cfg.backend == "hf" and pool is None else _tokenizer_only(getattr(cfg, role))
    preset = cfg.prompt_for(role)
    prompts = [encode(p.question, loaded.tokenizer, preset, cfg.instruction) for p in problems]
    ctx.update_manifest("prompt_example", role, value=render(problems[0].question, preset, loaded.tokenizer,
                                                             cfg.instruction))
    if pool is not None:
        _generate_sharded(ctx, pool, role, ds, problems, prompts, existing, key, rule)
        return
    backend = _backend(cfg, role, loaded)
    decode = lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ctx.log(f"generate {role} {ds.key}: {len(pending)} of {len(problems)} questions to answer "
            f"(greedy, max_new_tokens={cfg.max_new_tokens}, prompt={preset}, backend={backend.name})")
    generate_dataset(path, problems, prompts, backend, decode, cfg.gen_batch_size,
                     progress=ctx.progress, desc=f"generate {role} {ds.key}", truncated_rule=rule)


def _generate_sharded(ctx, pool, role: str, ds, problems, prompts, existing: list[dict], key: str, rule: str) -> None:
    """The one-process batches of the pending questions (those without a row in `existing`, the repaired file), spread
    over the pool's workers shard by shard; the rows are written in one-process order, in one atomic write, once every
    shard is done (circuitdiff.parallel)."""
    from circuitdiff.parallel.plan import batches_by_length, n_shards_for, padded_cost, plan_shards
    from circuitdiff.parallel.pool import Load
    from circuitdiff.parallel.shards import remove, run_sharded

    cfg, path = ctx.config, layout.generations(ctx.run, role, ds.key)
    folder = layout.generation_shards(ctx.run, role, ds.key)
    done = {r["idx"] for r in existing}
    pending = [(p, ids) for p, ids in zip(problems, prompts) if p.idx not in done]
    lengths = [len(ids) for _, ids in pending]
    batches = batches_by_length(lengths, cfg.gen_batch_size, tie=[p.idx for p, _ in pending])
    shards = plan_shards(batches, [padded_cost(b, lengths, cfg.max_new_tokens) for b in batches],
                         n_shards_for(len(batches), pool.workers, pool.shards_per_worker))
    model_cfg = getattr(cfg, role)
    load = Load.of(answerer, spec=model_cfg.spec, trust_remote_code=model_cfg.trust_remote_code, dtype=cfg.dtype,
                   device=cfg.device, attn_implementation=cfg.attn_implementation, backend=cfg.backend,
                   max_new_tokens=cfg.max_new_tokens)
    ctx.log(f"generate {role} {ds.key}: {len(pending)} of {len(problems)} questions to answer (greedy, "
            f"max_new_tokens={cfg.max_new_tokens}, prompt={cfg.prompt_for(role)}, backend={cfg.backend}, "
            f"batches of {cfg.gen_batch_size} as in one process)")
    results = run_sharded(
        pool, shards, folder=folder, job_key=settings_key({"generation": key, "rule": rule, "pending": [p.idx for p, _ in pending]}),
        suffix=".jsonl", load=load, fn=answer_batches,
        payload=lambda shard: {"batches": [[pending[i] for i in batch] for batch in shard.batches], "rule": rule},
        save=write_jsonl, read=_read_shard, name=f"generate {role} {ds.key}", log=ctx.log)
    by_idx = {row["idx"]: row for rows in results for row in rows}
    order = [pending[i][0].idx for batch in batches for i in batch]
    if set(by_idx) != set(order):
        raise UserError(f"the shards in {folder} do not hold the pending questions; delete that folder and run again")
    write_jsonl(path, existing + [by_idx[i] for i in order])
    remove(folder)


def _read_shard(path: Path) -> list[dict] | None:
    rows, damaged = read_jsonl_rows(path, artifacts.row_ok)
    return rows if damaged is None else None


def answerer(spec: str, trust_remote_code: bool, dtype: str, device: str, attn_implementation: str, backend: str,
             max_new_tokens: int):
    """A worker's generator (loaded once per worker): (backend, decode), as the one-process stage builds them."""
    from types import SimpleNamespace

    from circuitdiff.models import load_model

    model_cfg = SimpleNamespace(spec=spec, trust_remote_code=trust_remote_code)
    config = SimpleNamespace(backend=backend, dtype=dtype, max_new_tokens=max_new_tokens, base=model_cfg)
    if backend == "hf":
        loaded = load_model(spec, dtype, device, trust_remote_code=trust_remote_code,
                            attn_implementation=attn_implementation)
    else:
        loaded = _tokenizer_only(model_cfg)
    return _backend(config, "base", loaded), lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)


def answer_batches(generator, payload: dict) -> list[dict]:
    """A worker's part: the rows of the given batches of (problem, prompt ids), each batch generated as one process
    generates it, in batch order."""
    backend, decode = generator
    rows = []
    for batch in payload["batches"]:
        gens = backend.generate([ids for _, ids in batch])
        rows += [make_row(p, ids, g, decode, payload["rule"]) for (p, ids), g in zip(batch, gens)]
    return rows


def _check_rows_match(path: Path, rows: list[dict], problems: list[Problem]) -> None:
    by_idx = {p.idx: p for p in problems}
    for row in rows:
        p = by_idx.get(row["idx"])
        if p is not None and (p.question != row["question"] or p.gold != row["gold"]):
            raise UserError(f"{path}: question {row['idx']} differs from the dataset's (the source changed?); "
                            "use another run directory (--out) or delete that file")


def _backend(config, role: str, loaded) -> Backend:
    from circuitdiff.decoding import HFBackend, VLLMBackend, eos_token_ids

    if config.backend == "vllm":
        eos = eos_token_ids(loaded.model, loaded.tokenizer)  # loaded.model: a stand-in holding generation_config
        return VLLMBackend(getattr(config, role).spec, config.dtype, config.max_new_tokens, eos)
    return HFBackend(loaded.model, loaded.tokenizer, config.max_new_tokens)


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


# ---------------------------------------------------------------- rows
def repair(path: Path, log=None) -> list[dict]:
    """The rows a generations file can be trusted with, the file rewritten (atomically) to hold just them.

    A line cut off by a kill is dropped silently (appending stays safe); a damaged line elsewhere drops
    it and every row after it, with a line saying so: generation then answers those questions again.
    """
    rows, damaged = read_jsonl_rows(path, artifacts.row_ok)
    if damaged is not None and log is not None:
        log(f"{path} line {damaged} is damaged; keeping the {len(rows)} rows before it and answering the "
            "questions after it again")
    if path.exists():
        with open(path, "rb") as f:
            data = f.read()
        if damaged is not None or data.count(b"\n") != len(rows) or (data and not data.endswith(b"\n")):
            write_jsonl(path, rows)
    return rows


def make_row(problem: Problem, prompt_ids: list[int], gen: Generation, decode: Callable[[list[int]], str],
             truncated_rule: str = "strict") -> dict:
    text = decode(gen.answer_ids)
    graded = grade(text, problem.gold, problem.kind, finished=gen.stop == "eos", truncated_rule=truncated_rule)
    return artifacts.with_check({
        "idx": problem.idx,
        "question": problem.question,
        "gold": problem.gold,
        "kind": problem.kind,
        "prompt_ids": list(prompt_ids),
        "answer_ids": list(gen.answer_ids),
        "answer_text": text,
        "stop": gen.stop,
        "prediction": graded.prediction,
        "truncated": graded.truncated,
        "correct": graded.correct,
    })


def generate_dataset(
    path: str | Path,
    problems: Sequence[Problem],
    prompts: Sequence[list[int]],
    backend: Backend,
    decode: Callable[[list[int]], str],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
    truncated_rule: str = "strict",
) -> list[dict]:
    """Generate the answers missing from `path` (one row per question, see `make_row`) and return all rows.

    Rows of finished batches are appended as soon as the batch ends; questions whose idx is
    already in the file are skipped.
    """
    from tqdm.auto import tqdm

    if len(problems) != len(prompts):
        raise ValueError("problems and prompts differ in length")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1")
    from circuitdiff.parallel.plan import batches_by_length

    path = Path(path)
    done = {row["idx"] for row in repair(path)}
    pending = [(p, ids) for p, ids in zip(problems, prompts) if p.idx not in done]
    bar = tqdm(total=len(problems), initial=len(problems) - len(pending), desc=desc, unit="q",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:  # longest prompts first, ties by idx: the batches the parallel path shards
        for rows in batches_by_length([len(ids) for _, ids in pending], batch_size, tie=[p.idx for p, _ in pending]):
            batch = [pending[i] for i in rows]
            gens = backend.generate([ids for _, ids in batch])
            append_jsonl(path, [make_row(p, ids, g, decode, truncated_rule) for (p, ids), g in zip(batch, gens)])
            bar.update(len(batch))
    finally:
        bar.close()
    return read_jsonl_tolerant(path, artifacts.row_ok)
