"""Stage `attribute`: per-sample edge matrices W for a list of samples.

A sample is ``{"prompt_ids": [...], "answer_ids": [...], "cut_len": K}``; the loss is
the mean NLL of answer_ids[:K] given the prompt (method.md section 4). Samples are
batched by length (right padding), each batch is one forward and one backward.
With a ``work_dir`` every finished batch is kept on disk, so a killed run resumes
where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from circuitdiff import io
from circuitdiff.engine import EdgeAttributor, make_batch
from circuitdiff.errors import UserError
from circuitdiff.graph import GRANULARITIES
from circuitdiff.models import LoadedModel, load_model

LOSS_CONVENTION = "mean NLL of the model's own answer tokens answer_ids[:cut_len] given the prompt; summed over samples"
SIGN_CONVENTION = "W[d,u] = -<dL/dx_d, O_u>, summed over all positions (prompt included) and hidden dims; zero ablation"


@dataclass
class Attribution:
    """Per-sample edge scores: scores[k, d, u] for destination d and source u of sample k."""

    scores: np.ndarray  # [n_samples, n_dst, n_src]
    src_names: list[str]
    dst_names: list[str]
    edge_mask: np.ndarray  # bool [n_dst, n_src]; False = impossible edge (score 0)
    granularity: str
    loss: np.ndarray  # [n_samples]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return io.write_npz(
            path,
            scores=self.scores.astype(np.float32),
            src_names=np.asarray(self.src_names),
            dst_names=np.asarray(self.dst_names),
            edge_mask=self.edge_mask.astype(bool),
            granularity=np.asarray(self.granularity),
            loss=self.loss.astype(np.float32),
            meta=np.asarray(json.dumps(self.meta, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Attribution":
        with np.load(path, allow_pickle=False) as data:
            return cls(
                scores=data["scores"],
                src_names=[str(s) for s in data["src_names"]],
                dst_names=[str(s) for s in data["dst_names"]],
                edge_mask=data["edge_mask"].astype(bool),
                granularity=str(data["granularity"]) if "granularity" in data else "block",
                loss=data["loss"] if "loss" in data else np.full(len(data["scores"]), np.nan),
                meta=json.loads(str(data["meta"])) if "meta" in data else {},
            )


def check_sample(sample: dict, where: str) -> dict:
    """One sample, validated; `where` names it in the error (e.g. 'samples.jsonl line 3')."""
    for key in ("prompt_ids", "answer_ids", "cut_len"):
        if key not in sample:
            raise UserError(f"{where}: missing {key!r}; each sample needs prompt_ids, answer_ids and cut_len")
    prompt, answer, cut = sample["prompt_ids"], sample["answer_ids"], sample["cut_len"]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
        raise UserError(f"{where}: prompt_ids must be a non-empty list of token ids")
    if not isinstance(answer, list) or not all(isinstance(t, int) for t in answer):
        raise UserError(f"{where}: answer_ids must be a list of token ids")
    if not isinstance(cut, int) or not 1 <= cut <= len(answer):
        raise UserError(f"{where}: cut_len={cut!r} must be an integer in [1, len(answer_ids)={len(answer)}]")
    return {"prompt_ids": prompt, "answer_ids": answer, "cut_len": cut}


def read_samples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"samples file {path} does not exist; check the path")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path} line {number}: not valid JSON ({err.msg})") from None
                samples.append(check_sample(row, f"{path} line {number}"))
    if not samples:
        raise UserError(f"{path} holds no samples; write one JSON object per line")
    return samples


def as_samples(samples: str | Path | list[dict]) -> list[dict]:
    """A samples file (JSONL) or a list of sample dicts, validated; at least one."""
    if isinstance(samples, (str, Path)):
        return read_samples(samples)
    checked = [check_sample(s, f"sample {i}") for i, s in enumerate(samples)]
    if not checked:
        raise UserError("no samples given; pass at least one {prompt_ids, answer_ids, cut_len}")
    return checked


def resolve_model(model: str | LoadedModel | torch.nn.Module, dtype: str, device: str):
    """(spec, model as given or loaded, the Hugging Face causal LM): a spec is loaded in dtype on device."""
    spec = model if isinstance(model, str) else getattr(model, "spec", type(model).__name__)
    if isinstance(model, str):
        model = load_model(model, dtype, device, tokenizer=False)
    return spec, model, model.model if isinstance(model, LoadedModel) else model


def attribute(
    model: str | LoadedModel | torch.nn.Module,
    samples: str | Path | list[dict],
    *,
    granularity: str = "block",
    batch_size: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    gradient_checkpointing: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = False,
) -> Attribution:
    """Edge scores for every sample: one forward + one backward per batch of `batch_size`.

    `model`: a spec for `load_model` (loaded in `dtype` on `device`), a LoadedModel, or a
    Hugging Face causal LM already loaded. `work_dir`: keep each finished batch there
    and reuse it on a rerun with the same model, samples and settings.
    """
    if granularity not in GRANULARITIES:
        raise UserError(f"granularity {granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be >= 1")
    samples = as_samples(samples)
    spec, model, hf_model = resolve_model(model, dtype, device)

    engine = EdgeAttributor(hf_model, granularity, gradient_checkpointing)
    input_device = hf_model.get_input_embeddings().weight.device
    pad_id = getattr(hf_model.config, "pad_token_id", None) or 0
    # longest first: similar lengths share a batch, and a memory error shows up at once
    order = sorted(range(len(samples)), key=lambda i: -(len(samples[i]["prompt_ids"]) + samples[i]["cut_len"]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    key = _settings_key(hf_model, spec, granularity, samples, batch_size)
    work = Path(work_dir) if work_dir is not None else None

    scores = np.zeros((len(samples), len(engine.graph.dst_names), len(engine.graph.src_names)),
                      dtype=np.float64 if engine.score_dtype == torch.float64 else np.float32)
    losses = np.zeros(len(samples), dtype=scores.dtype)
    for number, rows in enumerate(tqdm(batches, desc=f"attribute ({granularity})", disable=not progress, unit="batch")):
        part = work / f"batch-{number:05d}-{key}.npz" if work is not None else None
        if part is not None and part.exists():
            with np.load(part) as done:
                W, loss = done["scores"], done["loss"]
        else:
            W_t, loss_t = engine.scores(make_batch([samples[i] for i in rows], pad_id, input_device))
            W, loss = W_t.numpy(), loss_t.numpy()
            if part is not None:
                io.write_npz(part, scores=W, loss=loss)
        scores[rows], losses[rows] = W, loss

    meta = {
        "method": "EAP (edge attribution patching, first order, one forward + one backward per batch)",
        "granularity": granularity,
        "loss": LOSS_CONVENTION,
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
    return Attribution(
        scores=scores,
        src_names=list(engine.graph.src_names),
        dst_names=list(engine.graph.dst_names),
        edge_mask=engine.graph.edge_mask.copy(),
        granularity=granularity,
        loss=losses,
        meta=meta,
    )


def _settings_key(model, spec, granularity, samples, batch_size) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([str(spec), granularity, batch_size, str(next(model.parameters()).dtype)]).encode())
    digest.update(json.dumps(samples, sort_keys=True).encode())
    digest.update(str(sum(p.numel() for p in model.parameters())).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "attribute",
        help="per-sample edge scores W (one forward + one backward per batch)",
        description="Score every edge of the residual graph for each sample with EAP and write W.npz.",
    )
    p.add_argument("--model", required=True, help="hub id, local dir, .gguf file, LoRA adapter dir, or smollm2-135m-instruct")
    p.add_argument("--samples", required=True, help='JSONL, one {"prompt_ids": [...], "answer_ids": [...], "cut_len": K} per line')
    p.add_argument("--granularity", choices=GRANULARITIES, default="block")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (accelerate device_map)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward (less memory)")
    p.add_argument("--out", required=True, help="output W.npz")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    out = Path(args.out)
    work = out.with_name(out.name + ".parts")
    result = attribute(
        args.model,
        args.samples,
        granularity=args.granularity,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
        work_dir=work,
        progress=True,
    )
    result.save(out)
    shutil.rmtree(work, ignore_errors=True)
    n, n_dst, n_src = result.scores.shape
    mean_abs = float(np.abs(result.scores).mean())
    print(
        f"wrote {out}: {n} samples x {n_dst} destinations x {n_src} sources "
        f"(granularity={result.granularity}, {int(result.edge_mask.sum())} edges); "
        f"mean |W| over all {n_dst}x{n_src} entries = {mean_abs:.4g}; mean loss = {float(result.loss.mean()):.4f} "
        f"(loss: {LOSS_CONVENTION})"
    )
    return 0
