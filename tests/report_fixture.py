"""A synthetic run directory with a planted change, for the report tests.

Dataset "planted": the tuned model's edges whose SOURCE is `PLANTED_SOURCE` are GAIN x
stronger than the base model's (all other edges keep their size), and a random half of its
questions have their whole W negated (|W| unchanged, questions less alike: diversity up). Dataset "null": base and tuned come from the
same distribution (nothing planted). Both share a per-edge scale and a per-question
pattern, as two models answering the same questions would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from circuitdiff.graph import Graph
from circuitdiff.store import layout
from circuitdiff.report.compute import group_node  # attn.1.h3 -> attn.1

PLANTED_SOURCE = "attn.1"
GAIN = 2.0


def _draw(rng, shape, df=4.0):
    return rng.standard_t(df, size=shape)


def write_w(path: Path, W: np.ndarray, graph: Graph, loss: np.ndarray, model: str, idx: list | None = None) -> None:
    """A W.npz as `circuitdiff attribute` writes it; `idx` (the samples' question ids) goes into meta like the run stage does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"granularity": graph.granularity, "n_layers": graph.n_layers, "model": model,
            "loss": "mean NLL of the model's own answer tokens answer_ids[:cut_len] given the prompt"}  # fmt: skip
    if idx is not None:
        meta["idx"] = list(idx)
    np.savez_compressed(
        path,
        scores=W.astype(np.float32),
        src_names=np.asarray(graph.src_names),
        dst_names=np.asarray(graph.dst_names),
        edge_mask=graph.edge_mask,
        granularity=np.asarray(graph.granularity),
        loss=loss.astype(np.float32),
        meta=np.asarray(json.dumps(meta)),
    )


def pair_matrices(rng, graph: Graph, n: int, planted: bool) -> tuple[np.ndarray, np.ndarray]:
    mask = graph.edge_mask
    shape = (n, *mask.shape)
    scale = np.exp(rng.normal(0.0, 1.0, mask.shape)) * 1e-3 * mask
    common = _draw(rng, mask.shape)  # shared by every question and both models
    question = _draw(rng, shape)  # what a question needs, the same for both models
    base = scale * (common + 0.8 * question + 0.3 * _draw(rng, shape))
    if planted:
        gain = np.ones(mask.shape)
        gain[:, [j for j, name in enumerate(graph.src_names) if group_node(name) == PLANTED_SOURCE]] = GAIN
        # a random half of the questions get their whole pattern negated: |W| is untouched, the
        # correlation between questions of opposite sign flips (diversity up)
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None, None]
        tuned = sign * scale * gain * (common + 0.8 * question + 0.3 * _draw(rng, shape))
    else:
        tuned = scale * (common + 0.8 * question + 0.3 * _draw(rng, shape))
    return base * mask, tuned * mask


def make_run(root: Path, n: int = 24, n_layers: int = 3, granularity: str = "qkv", seed: int = 0,
             n_heads: int = 1, n_kv_heads: int = 1) -> Path:  # fmt: skip
    """Writes the run and returns its directory. Pairs: planted@0.1, planted@0.3, null@0.1;
    planted@0.5 has only a base file (must be skipped)."""
    rng = np.random.default_rng(seed)
    graph = Graph(n_layers, granularity, n_heads, n_kv_heads)
    run = Path(root)
    for dataset, alpha, planted in (("planted", "0.1", True), ("planted", "0.3", True), ("null", "0.1", False)):
        base, tuned = pair_matrices(rng, graph, n, planted)
        idx = [100 + 3 * k for k in range(n)]
        write_w(layout.attribution(run, "base", dataset, float(alpha)), base, graph, rng.uniform(0.5, 1, n), "synthetic-base", idx)
        write_w(layout.attribution(run, "tuned", dataset, float(alpha)), tuned, graph, rng.uniform(0.3, 1, n), "synthetic-tuned", idx)
        sel = run / "selection" / dataset / f"alpha={alpha}.json"
        sel.parent.mkdir(parents=True, exist_ok=True)
        sel.write_text(json.dumps({"idx": [100 + 3 * k for k in range(n)], "T_bar": 120.0, "T_cut": int(float(alpha) * 120), "n_both_correct": 3 * n}))
    base, _ = pair_matrices(rng, graph, n, True)
    write_w(layout.attribution(run, "base", "planted", 0.5), base, graph, np.ones(n), "synthetic-base")
    (run / "manifest.json").write_text(json.dumps({"models": {"base": "synthetic-base", "tuned": "synthetic-tuned"}, "seed": seed}))
    return run
