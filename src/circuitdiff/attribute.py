"""`attribute`: per-sample edge matrices W for a list of samples (the Python API behind the stage and the CLI).

A sample is ``{"prompt_ids": [...], "answer_ids": [...], "cut_len": K}``; the objective is read at
answer_ids[:K] given the prompt: the mean NLL (``nll``, the paper's) or minus the mean centred
logit (``logit``, which does not saturate); docs/method.md. Samples are batched by length (right
padding); each batch is one forward and one backward (circuitdiff.engine). With a ``work_dir``
every finished batch is kept on disk, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitdiff import io
from circuitdiff.choices import DEFAULT_IG_RULE, DEFAULT_IG_STEPS, OBJECTIVES, method_definition, method_label
from circuitdiff.engine import EdgeAttributor, input_device, make_batch, pad_id_of
from circuitdiff.errors import UserError
from circuitdiff.graph import GRANULARITIES
from circuitdiff.models import LoadedModel, resolve_model
from circuitdiff.parallel.plan import batches_by_length
from circuitdiff.samples import as_samples, check_vocabulary
from circuitdiff.store import layout
from circuitdiff.store.artifacts import Attribution
from circuitdiff.store.keys import settings_key

__all__ = ["Attribution", "LOSS_CONVENTION", "SIGN_CONVENTION", "attribute", "loss_convention"]

LOSS_CONVENTION = ("mean NLL of the answer tokens answer_ids[:cut_len] given the prompt (the scored model's own answers "
                   "unless meta.text names the other model's); summed over samples")


def loss_convention(objective: str) -> str:
    """What the objective (the `loss` of a W file) is, in words."""
    return LOSS_CONVENTION if objective == "nll" else f"{OBJECTIVES[objective]}; summed over samples"
SIGN_CONVENTION = "W[d,u] = -<dL/dx_d, O_u>, summed over all positions (prompt included) and hidden dims; zero ablation"


def attribute(
    model: str | LoadedModel | torch.nn.Module,
    samples: str | Path | list[dict],
    *,
    granularity: str = "block",
    batch_size: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    gradient_checkpointing: bool = False,
    objective: str = "nll",
    method: str = "eap",
    ig_steps: int = DEFAULT_IG_STEPS,
    ig_rule: str = DEFAULT_IG_RULE,
    work_dir: str | Path | None = None,
    progress: bool = False,
    log=None,
) -> Attribution:
    """Edge scores for every sample: one forward + one backward per batch of `batch_size`.

    `model`: a spec for `load_model` (loaded in `dtype` on `device`), a LoadedModel, or a
    Hugging Face causal LM already loaded. `work_dir`: keep each finished batch there
    and reuse it on a rerun with the same model, samples and settings; a damaged batch file is
    discarded and recomputed (`log` says so).
    """
    check_settings(granularity, batch_size)
    samples = as_samples(samples)
    spec, model, hf_model = resolve_model(model, dtype, device)

    check_vocabulary(samples, hf_model.get_input_embeddings().weight.shape[0])
    engine = EdgeAttributor(hf_model, granularity, gradient_checkpointing, objective, method, ig_steps, ig_rule)
    label = method_label(method, ig_steps, ig_rule)
    device_in, pad_id = input_device(hf_model), pad_id_of(hf_model)
    batches = plan_batches(samples, batch_size)
    key = _parts_key(hf_model, spec, granularity, samples, batch_size, f"{objective}/{label}")
    work = Path(work_dir) if work_dir is not None else None

    scores = np.zeros((len(samples), len(engine.graph.dst_names), len(engine.graph.src_names)),
                      dtype=np.float64 if engine.score_dtype == torch.float64 else np.float32)
    losses = np.zeros(len(samples), dtype=scores.dtype)
    for number, rows in enumerate(tqdm(batches, desc=f"attribute ({granularity})", disable=not progress, unit="batch")):
        part = layout.attribution_batch(work, number, key) if work is not None else None
        kept = _read_part(part, len(rows), log) if part is not None and part.exists() else None
        if kept is not None:
            W, loss = kept
        else:
            W_t, loss_t = engine.scores(make_batch([samples[i] for i in rows], pad_id, device_in))
            W, loss = W_t.numpy(), loss_t.numpy()
            if part is not None:
                io.write_npz(part, scores=W, loss=loss)
        scores[rows], losses[rows] = W, loss
    return Attribution(scores=scores, loss=losses, **frame(engine, model, spec, granularity, batch_size,
                                                              gradient_checkpointing, objective, method, ig_steps, ig_rule))


def check_settings(granularity: str, batch_size: int) -> None:
    if granularity not in GRANULARITIES:
        raise UserError(f"granularity {granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be >= 1")


def plan_batches(samples: list[dict], batch_size: int) -> list[list[int]]:
    """The batches of one process: longest first (similar lengths share a batch, and a memory error shows up at
    once), ties in sample order. The parallel path (circuitdiff.parallel) shards exactly these batches."""
    return batches_by_length([len(s["prompt_ids"]) + s["cut_len"] for s in samples], batch_size)


def frame(engine: EdgeAttributor, model, spec, granularity: str, batch_size: int, gradient_checkpointing: bool,
          objective: str, method: str, ig_steps: int, ig_rule: str) -> dict:
    """Everything of a W file but the scores and losses: node names, the edge mask, the granularity and meta."""
    hf_model = engine.model
    meta = {
        "method": method_label(method, ig_steps, ig_rule),
        "method_definition": method_definition(method, ig_steps, ig_rule),
        "granularity": granularity,
        "objective": objective,
        "loss": loss_convention(objective),
        "sign": SIGN_CONVENTION,
        "score_dtype": str(engine.score_dtype).replace("torch.", ""),
        "model_dtype": str(next(hf_model.parameters()).dtype).replace("torch.", ""),
        "model": spec,
        "model_type": hf_model.config.model_type,
        "n_layers": engine.shape.n_layers,
        "n_heads": engine.shape.n_heads,
        "n_kv_heads": engine.shape.n_kv_heads,
        "batch_size": batch_size,
        "gradient_checkpointing": gradient_checkpointing,
        "n_edges": engine.graph.n_edges,
    }
    if isinstance(model, LoadedModel):
        meta["model_info"] = model.info
    return {"src_names": list(engine.graph.src_names), "dst_names": list(engine.graph.dst_names),
            "edge_mask": engine.graph.edge_mask.copy(), "granularity": granularity, "meta": meta}


def score_batches(model: LoadedModel, payload: dict) -> dict:
    """A worker's part (circuitdiff.parallel): the scores of the given batches, each computed as one process
    computes it. payload: samples {index: sample}, batches [[index, ...], ...], settings (attribute's keywords).
    Returns {"rows": sample indices, "scores": W [rows, n_dst, n_src], "loss": [rows], "frame": frame(...)}."""
    settings, samples = payload["settings"], payload["samples"]
    hf_model = model.model
    numbers = sorted(samples)
    check_vocabulary([samples[i] for i in numbers], hf_model.get_input_embeddings().weight.shape[0], numbers=numbers)
    engine = EdgeAttributor(hf_model, settings["granularity"], settings["gradient_checkpointing"],
                            settings["objective"], settings["method"], settings["ig_steps"], settings["ig_rule"])
    device_in, pad_id = input_device(hf_model), pad_id_of(hf_model)
    scores, losses = [], []
    for rows in payload["batches"]:
        W, loss = engine.scores(make_batch([samples[i] for i in rows], pad_id, device_in))
        scores.append(W.numpy())
        losses.append(loss.numpy())
    return {"rows": [i for rows in payload["batches"] for i in rows], "scores": np.concatenate(scores),
            "loss": np.concatenate(losses), "frame": frame(engine, model, model.spec, **settings)}


def _read_part(path: Path, n_rows: int, log) -> tuple[np.ndarray, np.ndarray] | None:
    """A finished batch's (W, loss), or None when the file is damaged (then it is deleted and recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as done:
            W, loss = np.asarray(done["scores"]), np.asarray(done["loss"])
        if W.ndim == 3 and len(W) == len(loss) == n_rows and np.isfinite(W).all():
            return W, loss
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    if log is not None:
        log(f"{path} is damaged; recomputing that batch")
    path.unlink(missing_ok=True)
    return None


def _parts_key(model, spec, granularity, samples, batch_size, objective) -> str:
    """The key in a finished batch's file name: the model, the settings and every sample (batch i depends on all)."""
    return settings_key({"model": str(spec), "granularity": granularity, "batch_size": batch_size, "objective": objective,
                         "dtype": str(next(model.parameters()).dtype),
                         "n_parameters": sum(p.numel() for p in model.parameters()), "samples": samples})


class _CallableModule(type(sys.modules[__name__])):
    """`circuitdiff.attribute(...)` is the README's API; once this module is imported, `circuitdiff.attribute` names
    the module (the import system binds it on the package), so the module calls the function."""

    def __call__(self, *args, **kwargs):
        return attribute(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
