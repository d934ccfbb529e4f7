"""Step 7: the files of a features folder, and the top latents' max-activating contexts.

latents.csv (one row per latent of the main crosscoder), latents_null.csv (the null crosscoder's),
summary.json (FVU per model, dead fraction, counts per class, the null control under "null", settings,
conventions), attribution.csv, interventions.csv, contexts.json, features.html (+ its histogram PNG).
Every file is written atomically; every number's conventions are in summary.json and in the page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from circuitdiff import io
from circuitdiff.features.classes import SHARED, LatentTable
from circuitdiff.features.crosscoder import Crosscoder
from circuitdiff.store import layout

N_CONTEXTS = 5
PER_CLASS = 5
BEFORE, AFTER = 12, 3


def chosen_latents(table: LatentTable, compact: list[int]) -> list[tuple[int, str]]:
    """(latent, why): the compact set, then the most frequent latents of each model-only class and of `shared`."""
    out = [(j, "compact set") for j in compact]
    seen = set(compact)
    for klass in [f"{label}-only" for label in table.labels] + [SHARED]:
        members = [j for j in range(table.n_latents) if table.klass[j] == klass and j not in seen]
        members.sort(key=lambda j: -table.frequency[j])
        for j in members[:PER_CLASS]:
            out.append((j, f"most frequent {klass}"))
            seen.add(j)
    return out


@torch.no_grad()
def top_rows(cc: Crosscoder, data: list[torch.Tensor], latents: list[int], n_top: int = N_CONTEXTS,
             batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(values [L, n_top], rows [L, n_top]): each latent's largest activations on held-out rows (-1: fewer fired)."""
    L = len(latents)
    best_v = torch.full((L, n_top), -1.0)
    best_r = torch.full((L, n_top), -1, dtype=torch.long)
    if not L:
        return best_v.numpy(), best_r.numpy()
    index = torch.tensor(latents)
    n = int(data[0].shape[0])
    for start in range(0, n, batch_size):
        x = cc.normalise([t[start : start + batch_size] for t in data])
        f = cc.encode(x)[:, index.to(x.device)].T.cpu()  # [L, B]
        rows = torch.arange(start, start + f.shape[1]).expand(L, -1)
        values = torch.cat([best_v, torch.where(f > 0, f, torch.full_like(f, -1.0))], 1)
        top = torch.topk(values, n_top, dim=1)
        best_v, best_r = top.values, torch.gather(torch.cat([best_r, rows], 1), 1, top.indices)
    return best_v.numpy(), best_r.numpy()


def context_text(ids: np.ndarray, pos: int, decode) -> str:
    return (decode(ids[max(0, pos - BEFORE) : pos].tolist()) + "[[" + decode(ids[pos : pos + 1].tolist()) + "]]"
            + decode(ids[pos + 1 : pos + 1 + AFTER].tolist())).replace("\n", "\\n")


def contexts(cc: Crosscoder, data: list[torch.Tensor], kept: np.ndarray, plan, table: LatentTable, compact: list[int],
             decode, target: str) -> dict:
    """contexts.json: for each chosen latent, its class, relative norm, frequency and max-activating contexts.
    data: the held-out rows `kept` (row numbers in the held-out shards)."""
    chosen = chosen_latents(table, compact)
    values, rows = top_rows(cc, data, [j for j, _ in chosen])
    every = [rc for shard in plan.held_shards() for rc in plan.rows(shard)]
    where = [every[i] for i in kept]
    out = []
    rel = table.relative_norm(target)
    for (j, why), vs, rs in zip(chosen, values, rows):
        top = []
        for v, r in zip(vs, rs):
            if r < 0 or v <= 0:
                continue
            seq, pos = where[int(r)]
            top.append({"activation": float(v), "context": context_text(plan.sequence(seq), pos, decode),
                        "source": plan.source_names[int(plan.source[seq])]})
        out.append({"latent": int(j), "class": table.klass[j], "relative_norm": float(rel[j]),
                    "frequency": float(table.frequency[j]), "why": why, "top": top})
    return {"latents": out, "convention": f"held-out tokens; activation f_j in normalised units; context: {BEFORE} "
                                          f"tokens before, the token in [[ ]], {AFTER} after; newlines as \\n"}


def write_csv(path: Path, rows: list[dict]) -> None:
    from circuitdiff.report.tables import to_csv

    columns = list(dict.fromkeys(k for row in rows for k in row)) if rows else ["empty"]
    io.write_text(path, to_csv(rows, columns))


def write_page(folder: Path) -> Path:
    """features.html of the folder (+ the histogram PNG beside it)."""
    from circuitdiff.report.features import feature_sections
    from circuitdiff.report.html import Figure, render_page

    sections = feature_sections(folder)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                io.write_bytes(layout.features_file(folder, "histogram"), block.png)
                block.filename = layout.FEATURES_FILES["histogram"]
    return io.write_text(layout.features_file(folder, "html"),
                         render_page("circuitdiff features: crosscoder model diffing", f"Folder: {folder.resolve()}",
                                     sections))
