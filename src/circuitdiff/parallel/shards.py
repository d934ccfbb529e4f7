"""Running planned shards on a worker pool, one file per finished shard, skipped on resume (no Ray import here).

`run_sharded` looks in the job's shards folder first: a shard whose file is there and reads back
is done; a damaged one is deleted and redone, with a line saying so. The rest go to the pool's
dynamic queue; each result is written atomically (circuitdiff.io, by `save`) the moment it
arrives, so a killed run, a killed worker or a lost node costs only the shards in flight. The
caller merges the results (in one-process order) and then removes the folder.

A shard's file name holds its number and a key of the job (settings, model, every input) and of
its own items: a rerun with other settings, inputs or another plan never reads a stale shard.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

from circuitdiff.parallel.plan import Shard
from circuitdiff.store import layout
from circuitdiff.store.keys import settings_key


def shard_path(folder: Path, shard: Shard, job_key: str, suffix: str) -> Path:
    return layout.shard_file(folder, shard.number, settings_key({"job": job_key, "batches": shard.batches}), suffix)


def run_sharded(pool, shards: Sequence[Shard], *, folder: Path, job_key: str, suffix: str, load, fn: Callable,
                payload: Callable[[Shard], object], save: Callable[[Path, object], None],
                read: Callable[[Path], object | None], name: str, log: Callable[[str], None] = print) -> list:
    """The result of every shard, in the order of `shards`: read back from its file when it is done, else
    computed by fn(loaded, payload(shard)) on a worker that holds load's result, then saved.

    read(path) returns None for a damaged file (it is then deleted and the shard redone)."""
    from circuitdiff.parallel.pool import Task

    folder = Path(folder)
    results: list = [None] * len(shards)
    tasks, paths = [], {}
    for position, shard in enumerate(shards):
        path = shard_path(folder, shard, job_key, suffix)
        done = read(path) if path.exists() else None
        if done is None and path.exists():
            log(f"{path} is damaged; redoing that shard")
            path.unlink(missing_ok=True)
        if done is not None:
            results[position] = done
            continue
        paths[shard.number] = (position, path)
        tasks.append(Task(shard.number, f"{name} shard {shard.number + 1}/{len(shards)}", load, fn, payload(shard)))
    kept = len(shards) - len(tasks)
    log(f"{name}: {len(shards)} shards over {pool.workers} workers, {kept} already done, {len(tasks)} to compute")

    def on_result(task, result) -> None:
        position, path = paths[task.number]
        save(path, result)
        results[position] = result

    pool.run(tasks, on_result, log)
    return results


def remove(folder: Path) -> None:
    """The shards folder of a merged job."""
    shutil.rmtree(folder, ignore_errors=True)
