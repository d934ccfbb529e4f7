"""Attribution spread over workers: the W of `circuitdiff.attribute` in one process, computed shard by shard.

The samples are cut into the batches one process would run (attribute.plan_batches), the batches
grouped into shards balanced by padded length (plan.py), the shards sent through the pool's
dynamic queue to workers that each load the model once, every finished shard written atomically
to `work_dir` (a rerun skips it), and the shards merged into one Attribution, sample k in row k:
the same names, mask, meta and scores as one process (each batch is the same computation).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from circuitdiff import io
from circuitdiff.choices import DEFAULT_IG_RULE, DEFAULT_IG_STEPS, METHODS, OBJECTIVES, check_choice
from circuitdiff.errors import UserError
from circuitdiff.parallel.plan import n_shards_for, padded_cost, plan_shards
from circuitdiff.parallel.shards import run_sharded
from circuitdiff.samples import as_samples
from circuitdiff.store.artifacts import Attribution
from circuitdiff.store.keys import settings_key


def attribute_sharded(pool, model: str, samples, *, work_dir: str | Path, granularity: str = "block",
                      batch_size: int = 1, dtype: str = "float32", device: str = "cpu",
                      attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                      gradient_checkpointing: bool = False, objective: str = "nll", method: str = "eap",
                      ig_steps: int = DEFAULT_IG_STEPS, ig_rule: str = DEFAULT_IG_RULE, name: str = "attribute",
                      log=print) -> Attribution:
    """`circuitdiff.attribute.attribute` on `pool`'s workers; `model` is a spec (each worker loads it)."""
    from circuitdiff.attribute import check_settings, plan_batches, score_batches
    from circuitdiff.models import load_model
    from circuitdiff.parallel.pool import Load

    if not isinstance(model, str):
        raise UserError("with more than one worker, pass the model as a spec (each worker loads its own copy)")
    check_settings(granularity, batch_size)
    check_choice("objective", objective, OBJECTIVES)
    check_choice("method", method, METHODS)
    samples = as_samples(samples)
    batches = plan_batches(samples, batch_size)
    lengths = [len(s["prompt_ids"]) + s["cut_len"] for s in samples]
    shards = plan_shards(batches, [padded_cost(b, lengths) for b in batches],
                         n_shards_for(len(batches), pool.workers, pool.shards_per_worker))
    settings = {"granularity": granularity, "batch_size": batch_size, "gradient_checkpointing": gradient_checkpointing,
                "objective": objective, "method": method, "ig_steps": ig_steps, "ig_rule": ig_rule}
    load = Load.of(load_model, spec=model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                   attn_implementation=attn_implementation, tokenizer=False)
    job_key = settings_key({"model": model, "dtype": dtype, "attn_implementation": attn_implementation,
                            "samples": samples, **{k: v for k, v in settings.items() if k != "gradient_checkpointing"}})
    results = run_sharded(pool, shards, folder=Path(work_dir), job_key=job_key, suffix=".npz", load=load,
                          fn=score_batches, payload=lambda shard: {"samples": {i: samples[i] for i in shard.items},
                                                                   "batches": shard.batches, "settings": settings},
                          save=save_shard, read=read_shard, name=name, log=log)
    return merge(results, len(samples))


def merge(results: list[dict], n_samples: int) -> Attribution:
    """One Attribution from the shards' results (sample k in row k); every sample exactly once."""
    frame = results[0]["frame"]
    first = results[0]["scores"]
    scores = np.zeros((n_samples, *first.shape[1:]), dtype=first.dtype)
    losses = np.zeros(n_samples, dtype=results[0]["loss"].dtype)
    seen = np.zeros(n_samples, dtype=int)
    for result in results:
        other = result["frame"]
        if other["src_names"] != frame["src_names"] or other["dst_names"] != frame["dst_names"]:
            raise UserError("the workers' models disagree on the graph's nodes; every worker must load the same model")
        rows = np.asarray(result["rows"], dtype=int)
        scores[rows], losses[rows] = result["scores"], result["loss"]
        seen[rows] += 1
    if not (seen == 1).all():  # a planning error, never a user's: every sample belongs to one shard
        raise RuntimeError(f"shards cover samples {np.flatnonzero(seen != 1).tolist()} other than once")
    return Attribution(scores=scores, loss=losses, src_names=list(frame["src_names"]),
                       dst_names=list(frame["dst_names"]), edge_mask=np.asarray(frame["edge_mask"], dtype=bool),
                       granularity=frame["granularity"], meta=frame["meta"])


def save_shard(path: Path, result: dict) -> None:
    frame = result["frame"]
    io.write_npz(path, rows=np.asarray(result["rows"], dtype=np.int64), scores=result["scores"], loss=result["loss"],
                 src_names=np.asarray(frame["src_names"]), dst_names=np.asarray(frame["dst_names"]),
                 edge_mask=np.asarray(frame["edge_mask"], dtype=bool),
                 frame=np.asarray(json.dumps({"granularity": frame["granularity"], "meta": frame["meta"]})))


def read_shard(path: Path) -> dict | None:
    """A finished shard, or None when its file is damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            rows, scores, loss = np.asarray(data["rows"]), np.asarray(data["scores"]), np.asarray(data["loss"])
            extra = json.loads(str(data["frame"]))
            frame = {"src_names": [str(s) for s in data["src_names"]], "dst_names": [str(s) for s in data["dst_names"]],
                     "edge_mask": np.asarray(data["edge_mask"], dtype=bool), **extra}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    shape_ok = scores.ndim == 3 and scores.shape[1:] == (len(frame["dst_names"]), len(frame["src_names"]))
    if not (shape_ok and len(rows) == len(scores) == len(loss) and np.isfinite(scores).all()):
        return None
    return {"rows": rows.tolist(), "scores": scores, "loss": loss, "frame": frame}
