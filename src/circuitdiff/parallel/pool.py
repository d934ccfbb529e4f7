"""Ray workers and the dynamic queue that feeds them shards (the only module that imports Ray, and only when used).

- `Pool(workers, address, ...)`: without an address it starts a local Ray cluster sized for the
  workers (one laptop, one multi-GPU box); with one (``host:port``, ``ray://host:port``, ``auto``)
  it joins a running cluster (``ray start --head`` on a node; docs/parallel.md). An already
  initialised Ray (e.g. the caller's own ``ray.init``) is used as it is. Each worker is an actor
  holding ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs.
- Each worker loads what a task needs (`Load`: a model, a tokenizer, a vLLM engine) once and keeps it
  while the next tasks ask for the same thing.
- `Pool.run(tasks, on_result)`: a dynamic queue, tasks handed out in the given order (the planner
  puts the costliest first) to whichever worker is free; `on_result` runs in this process as each
  result arrives (the caller writes the shard to disk there). A worker that dies mid-task (killed,
  out of memory, its node lost) loses only that task: a new worker takes its place and the task
  is redone, up to `MAX_ATTEMPTS` times. A UserError raised in a worker is raised here as the same
  one line.

Fault injection (tests only): with CIRCUITDIFF_KILL_SHARD="N:MARKER" in this process's environment,
the worker that starts task number N kills itself (SIGKILL) once, after loading its model, and leaves
the file MARKER (so the redone task runs). Unset (always, outside tests): nothing.
"""

from __future__ import annotations

import gc
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from circuitdiff.errors import UserError
from circuitdiff.parallel.plan import SHARDS_PER_WORKER

RAY_EXTRA = 'pip install "circuitdiff[ray]"'
MAX_ATTEMPTS = 3
READY_TIMEOUT_S = 300.0
CONNECT_TIMEOUT_S = 5.0
KILL_ENV = "CIRCUITDIFF_KILL_SHARD"


@dataclass(frozen=True)
class Load:
    """What a worker loads for a task: fn(**kwargs), kept while later tasks ask for the same fn and kwargs."""

    fn: Callable
    kwargs: tuple  # sorted (name, value) pairs

    @classmethod
    def of(cls, fn: Callable, **kwargs) -> "Load":
        return cls(fn, tuple(sorted(kwargs.items())))

    @property
    def key(self) -> tuple:
        return (self.fn.__module__, self.fn.__qualname__, self.kwargs)


@dataclass
class Task:
    number: int  # the shard's number (names it in messages and in the fault injection)
    name: str
    load: Load
    run: Callable  # run(loaded, payload) -> result, in the worker
    payload: object
    attempts: int = 0


def import_ray():
    """The ray module, or one line naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UserError(f"more than one worker needs Ray, which is not installed: {RAY_EXTRA} (scripts/setup.sh "
                        "installs it), or use --workers 1") from None
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A Ray address answers on its port (a quick TCP connect), else one line with the fix."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[1] if "://" in address else address
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default), "
                        "ray://HOST:PORT (Ray Client, 10001) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise UserError(f"cannot reach a Ray cluster at {address} ({why}); start one there with `ray start --head "
                        "--port=6379` (docs/parallel.md), or leave out --ray-address to start a local cluster") from None


class Worker:
    """A Ray actor (wrapped by `ray.remote` when the pool starts): loads once, then runs tasks."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.key, self.loaded = None, None

    def ready(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def run(self, load: Load, fn: Callable, payload, number: int, fault: str | None = None):
        if load.key != self.key:
            self.loaded, self.key = None, None
            gc.collect()
            self.loaded, self.key = load.fn(**dict(load.kwargs)), load.key
        _fault_point(fault, number)
        return fn(self.loaded, payload)


def _fault_point(fault: str | None, number: int) -> None:
    if not fault:
        return
    target, _, marker = fault.partition(":")
    if int(target) == number and marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"killed worker {os.getpid()} at task {number}\n")
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class Pool:
    """`workers` Ray actors; use as a context manager (or open() / close())."""

    def __init__(self, workers: int, address: str | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, shards_per_worker: int = SHARDS_PER_WORKER,
                 log: Callable[[str], None] = print, ready_timeout: float = READY_TIMEOUT_S):
        if workers < 1:
            raise UserError(f"--workers {workers} must be >= 1")
        self.workers, self.address, self.log = int(workers), address, log
        self.shards_per_worker = int(shards_per_worker)
        self.cpus, self.gpus, self.ready_timeout = float(cpus_per_worker), float(gpus_per_worker), ready_timeout
        self.ray, self.actors, self.started_ray, self._actor_class = None, [], False, None

    @classmethod
    def of(cls, settings, device: str, log: Callable[[str], None] = print) -> "Pool":
        """The pool a config.ParallelConfig asks for (GPUs per worker by the device when unset)."""
        return cls(settings.workers, settings.address, settings.cpus_per_worker, settings.gpus(device),
                   settings.shards_per_worker, log=log)

    # ------------------------------------------------------------ life
    def __enter__(self) -> "Pool":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "Pool":
        if self.actors:
            return self
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            self._start_or_join(ray)
        self._check_resources(ray)
        self._actor_class = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)(Worker)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        try:
            where = ray.get([a.ready.remote() for a in self.actors], timeout=self.ready_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise UserError(f"the {self.workers} Ray workers did not start within {self.ready_timeout:.0f} s; check "
                            "`ray status` (resources free?) or use fewer --workers") from None
        hosts = sorted({w.split(":")[0] for w in where})
        self.log(f"parallel: {self.workers} Ray workers ready ({self.cpus:g} CPU, {self.gpus:g} GPU each) on "
                 f"{len(hosts)} node(s): {', '.join(hosts)}")
        return self

    def close(self) -> None:
        ray = self.ray
        if ray is None:
            return
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # pragma: no cover - already gone
                pass
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def _start_or_join(self, ray) -> None:
        if self.address:
            check_address(self.address)
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            except Exception as err:  # not a Ray head, another Ray version, no cluster for "auto"
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise UserError(f"cannot join the Ray cluster at {self.address} ({first}); check the address "
                                "(`ray status` on the head prints it) and that both sides run the same Ray") from None
        else:
            cpus = max(os.cpu_count() or 1, int(self.workers * self.cpus + 0.999))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        self.started_ray = True

    def _check_resources(self, ray) -> None:
        have, free = ray.cluster_resources(), ray.available_resources()
        for name, each in (("CPU", self.cpus), ("GPU", self.gpus)):
            need = each * self.workers
            if need > have.get(name, 0) + 1e-9:
                self.close()
                raise UserError(f"{self.workers} workers x {each:g} {name} each need {need:g} {name}s, the Ray cluster "
                                f"has {have.get(name, 0):g}; use fewer --workers or change --{name.lower()}s-per-worker")
            if need > free.get(name, 0) + 1e-9:
                self.log(f"parallel: {need:g} {name}s wanted, {free.get(name, 0):g} of {have.get(name, 0):g} free now: "
                         f"waiting up to {self.ready_timeout:.0f} s for other jobs to release them")

    def _new_actor(self):
        return self._actor_class.remote(max(1, int(self.cpus)))

    # ------------------------------------------------------------ work
    def run(self, tasks: Sequence[Task], on_result: Callable[[Task, object], None], log=None) -> None:
        """Every task once (a task whose worker died is redone on a new worker); on_result as results arrive;
        log (default the pool's) hears of every worker that died."""
        if not tasks:
            return
        log = log or self.log
        ray, fault = self.ray, os.environ.get(KILL_ENV)
        queue, idle, running = deque(tasks), list(self.actors), {}
        try:
            while queue or running:
                while queue and idle:
                    actor, task = idle.pop(0), queue.popleft()
                    task.attempts += 1
                    running[actor.run.remote(task.load, task.run, task.payload, task.number, fault)] = (actor, task)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, task = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the task itself raised
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, UserError):
                        raise UserError(str(cause)) from None
                    raise
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError) as err:
                    replacement = self._replace(actor)
                    if task.attempts >= MAX_ATTEMPTS:
                        raise UserError(f"{task.name}: its worker died {task.attempts} times ({type(err).__name__}); "
                                        "check the workers' memory, or use fewer --workers") from None
                    log(f"parallel: a worker died during {task.name} ({type(err).__name__}); only that shard is "
                             "lost: redoing it on a new worker")
                    queue.appendleft(task)
                    idle.append(replacement)
                    continue
                on_result(task, result)
                idle.append(actor)
        finally:  # stopped by an error: the other shards in flight are dropped (their files were never written)
            for ref in running:
                try:
                    ray.cancel(ref)
                except Exception:  # pragma: no cover - finished or its worker gone in the meantime
                    pass

    def _replace(self, dead):
        try:
            self.ray.kill(dead)
        except Exception:  # pragma: no cover - already gone
            pass
        actor = self._new_actor()
        self.actors = [actor if a is dead else a for a in self.actors]
        return actor
