"""Option groups shared by several commands, so that a flag means the same everywhere."""

from __future__ import annotations

from pydantic import ValidationError

from circuitdiff.choices import DEFAULT_IG_RULE, DEFAULT_IG_STEPS, DTYPE_NAMES, IG_RULES, METHODS, OBJECTIVES
from circuitdiff.errors import UserError
from circuitdiff.graph import GRANULARITIES
from circuitdiff.store.layout import ROLES

MODEL_HELP = "hub id, local dir, .gguf file, LoRA adapter dir, or smollm2-135m-instruct"
SAMPLES_HELP = 'JSONL, one {"prompt_ids": [...], "answer_ids": [...], "cut_len": K} per line'


def add_model(p, required: bool = True, dtype_default: str | None = "float32") -> None:
    """--model, --dtype, --device."""
    p.add_argument("--model", required=required, help=MODEL_HELP)
    add_dtype_device(p, dtype_default)


def add_dtype_device(p, dtype_default: str | None = "float32", device_default: str = "cpu") -> None:
    default = f"default {dtype_default}" if dtype_default else "default: the run's dtype"
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=dtype_default, help=f"model dtype ({default})")
    p.add_argument("--device", default=device_default, help="cpu, cuda, cuda:N, or auto (accelerate device_map)")


def add_granularity(p) -> None:
    p.add_argument("--granularity", choices=GRANULARITIES, default="block")


def add_objective(p) -> None:
    p.add_argument("--objective", choices=list(OBJECTIVES), default="nll",
                   help="nll: mean NLL of the answer tokens (the paper's; saturates as the model grows sure); logit: "
                        "minus the mean centred logit of the answer tokens (linear in the final norm's output)")


def add_method(p, default_steps: int = DEFAULT_IG_STEPS) -> None:
    """--method, --ig-steps, --ig-rule: how W is scored."""
    p.add_argument("--method", choices=list(METHODS), default="eap",
                   help="eap: first order, one forward + backward (the paper's); eap-ig: integrated gradients from the "
                        "zero input, --ig-steps forward + backward passes")
    p.add_argument("--ig-steps", type=int, default=default_steps,
                   help=f"eap-ig: quadrature points K (default {default_steps}; cost ~K+1 EAP passes)")
    p.add_argument("--ig-rule", choices=list(IG_RULES), default=DEFAULT_IG_RULE,
                   help="eap-ig: midpoint (Riemann, default), gauss (Gauss-Legendre), right (t=k/K; K=1 is EAP)")


def add_run_target(p, run_required: bool = False, role_default: str = "tuned") -> None:
    """--run, --role, --dataset, --alpha: one (role, dataset, alpha) of a run directory."""
    p.add_argument("--run", required=run_required, help="run directory written by `circuitdiff run`")
    p.add_argument("--role", choices=ROLES, default=role_default, help=f"which model of the run (default {role_default})")
    p.add_argument("--dataset", required=run_required, help="dataset key (e.g. gsm8k)")
    p.add_argument("--alpha", type=float, required=run_required, help="the alpha of the selection (and its T_cut)")


def add_parallel(p, workers_default: int | None = 1) -> None:
    """--workers, --ray-address, --cpus-per-worker, --gpus-per-worker: the fan-out over Ray workers."""
    default = f"default {workers_default}" if workers_default else "default: the config's parallel.workers, else 1"
    p.add_argument("--workers", type=int, default=workers_default,
                   help=f"spread the work over N Ray workers, each loading the model once ({default}; 1: this process, "
                        'no Ray). Needs the ray extra: pip install "circuitdiff[ray]"')
    p.add_argument("--ray-address", help="join the running Ray cluster at HOST:PORT (`ray start --head` there; "
                                         "docs/parallel.md); default: start a local cluster for the workers")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each worker holds (its torch threads; default 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs each worker holds (default 1 on cuda/auto, else 0)")


def parallel_from(args, config=None):
    """The ParallelConfig of the command line over the config's own `parallel` (None: one process)."""
    from circuitdiff.config import ParallelConfig

    given = {"workers": args.workers, "address": args.ray_address, "cpus_per_worker": args.cpus_per_worker,
             "gpus_per_worker": args.gpus_per_worker}
    values = {**(config.model_dump() if config is not None else {}), **{k: v for k, v in given.items() if v is not None}}
    if not values:
        return None
    settings = settings_from(ParallelConfig, "parallel", **values)
    if settings.address and settings.workers < 2:
        raise UserError("--ray-address joins a cluster for the workers: give --workers N (N >= 2) too")
    return settings


def writable_file(path: str) -> str:
    """--out FILE checked before any work: not a directory, and its folder can be created and written."""
    from pathlib import Path

    out = Path(path)
    if out.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name inside it (e.g. W.npz)")
    writable_dir(str(out.parent if str(out.parent) else "."))
    return path


def writable_dir(path: str) -> str:
    """--out DIR checked before any work: it can be created and written."""
    import os
    from pathlib import Path

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {path} is a file, not a directory; give a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {path}: cannot create it ({err.strerror}); choose another path") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"--out {path} is not writable; choose another path")
    return path


def check_early(args, out: str = "dir") -> None:
    """Before any work: --out ("dir": a directory, "file": a file; when given) and --device."""
    from circuitdiff.models.checks import check_device

    if getattr(args, "out", None):
        (writable_dir if out == "dir" else writable_file)(args.out)
    if args.device != "auto":
        check_device(args.device)


def settings_from(cls, origin: str, **values):
    """A pydantic settings object from command-line values; a bad value is one line naming the flag."""
    try:
        return cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else origin
        raise UserError(f"{origin}: {flag}: {first['msg']}") from None


def defaults(cls):
    """A dataclass's field defaults as attributes, without running its checks (they may import heavy modules)."""
    from dataclasses import MISSING, fields
    from types import SimpleNamespace

    return SimpleNamespace(**{f.name: f.default for f in fields(cls) if f.default is not MISSING})
