"""Exact effects of edge edits: the loss with edges removed or scaled, and greedy answers under edits.

exact_edge_effects measures, for every chosen edge (u -> d), dL = L(edge scaled) - L(clean),
where "scaled by s" means d receives x_d - s * O_u and every other node is unchanged (s = 1:
zero ablation, the loss change that EAP estimates to first order). One sample at a time:

1. one clean forward records every needed source output O_u [1, pos, d_model] and every
   decoder layer's output;
2. the sample is replicated along the batch axis: row 0 stays clean, row r edits edge r only
   (a coefficient tensor that is `scale` in row r and 0 elsewhere), so dL = loss[r] - loss[0]
   of the same forward;
3. edges are sorted by destination; a batch whose earliest destination is in layer l replays
   the recorded clean outputs of layers < l instead of recomputing them (nothing before d
   changes when only d's input is edited).
"""

from __future__ import annotations

import contextlib
from functools import partial
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from circuitdiff.engine.batch import input_device, make_batch, pad_id_of
from circuitdiff.engine.editor import EdgeEditor
from circuitdiff.engine.objectives import answer_loss, check_objective
from circuitdiff.errors import UserError
from circuitdiff.graph import Edge, dst_layer, parse_edge


@torch.no_grad()
def losses_with_edits(model, editor: EdgeEditor, samples: list[dict], edits, batch_size: int = 8,
                      objective: str = "nll") -> np.ndarray:
    """Per-sample objective [n_samples] (float64) with `edits` [(edge, coefficient)] active, sources live."""
    device, pad_id = input_device(model), pad_id_of(model)
    out = np.zeros(len(samples))
    for start in range(0, len(samples), batch_size):
        batch = make_batch(samples[start : start + batch_size], pad_id, device)
        with editor.edits(edits):
            hidden = editor.nodes.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           use_cache=False).last_hidden_state
            out[start : start + batch_size] = answer_loss(model, editor.adapter, hidden, batch,
                                                          objective).double().cpu().numpy()
    return out


def generate_with_edits(model, editor: EdgeEditor, prompts: list[list[int]], edits, *, eos_ids: Sequence[int],
                        pad_id: int | None = None, max_new_tokens: int = 128, batch_size: int = 16) -> list:
    """Greedy answers (decoding.Generation: answer_ids before EOS, stop) with `edits` active, KV cache on.

    Batching as the pipeline's generate stage (HFBackend: left padding, prompts sorted by length,
    longest first); the order of the returned list is that of `prompts`.
    """
    from circuitdiff.decoding import HFBackend

    tokenizer = SimpleNamespace(eos_token_id=list(eos_ids), pad_token_id=pad_id)
    backend = HFBackend(model, tokenizer, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results: list = [None] * len(prompts)
    with editor.edits(edits):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for i, gen in zip(rows, backend.generate([prompts[i] for i in rows])):
                results[i] = gen
    return results


@torch.no_grad()
def exact_edge_effects(
    model: torch.nn.Module,
    samples: list[dict],
    edges: Sequence[Edge],
    *,
    granularity: str = "block",
    scale: float = 1.0,
    batch_size: int = 32,
    objective: str = "nll",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(dL [n_samples, n_edges], clean objective [n_samples]), float64 numpy (`objective`: engine/objectives.py).

    dL[k, e] = L_k(edge e scaled) - L_k(clean): destination d receives x_d - scale * O_u
    (scale=1: the edge is removed; scale=eps: a small ablation for finite differences).
    `batch_size` rows per forward: one clean row plus batch_size - 1 edges of one sample.
    """
    if batch_size < 2:
        raise UserError(f"batch size {batch_size} must be >= 2 (one clean row plus at least one edge)")
    check_objective(objective)
    editor = EdgeEditor(model, granularity)
    graph = editor.graph
    for edge in edges:
        parse_edge(edge.name, graph)
    n_layers = editor.shape.n_layers
    order = sorted(range(len(edges)), key=lambda e: (graph.dst_index[edges[e].dst], graph.src_index[edges[e].src]))
    per_chunk = batch_size - 1
    chunks = [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]
    backbone = editor.nodes.backbone
    device, pad_id = input_device(model), pad_id_of(model)
    needed = {e.src for e in edges}

    dL = np.zeros((len(samples), len(edges)), dtype=np.float64)
    clean = np.zeros(len(samples), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples) * len(chunks), desc=f"exact ablation ({granularity})", unit="fwd", disable=not progress)
        for k, sample in enumerate(samples):
            # 1. clean forward: source outputs and layer outputs
            sources: dict[str, torch.Tensor] = {}
            layer_out: list = [None] * n_layers
            handles = editor.source_hooks(needed, sources)
            handles += [layer.register_forward_hook(partial(_record_layer, layer_out, i)) for i, layer in enumerate(editor.layers)]
            try:
                batch = make_batch([sample], pad_id, device)
                out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                clean[k] = float(answer_loss(model, editor.adapter, out.last_hidden_state, batch, objective)[0])
            finally:
                for handle in handles:
                    handle.remove()
            sources = {name: t.detach() for name, t in sources.items()}
            # 2. batches of edges, row 0 clean
            for chunk in chunks:
                n_rows = len(chunk) + 1
                start = min(dst_layer(edges[e].dst, n_layers) for e in chunk)
                coefs = []
                for row, e in enumerate(chunk, 1):
                    c = torch.zeros(n_rows, dtype=torch.float64)
                    c[row] = scale
                    coefs.append((edges[e], c))
                batch = make_batch([sample] * n_rows, pad_id, device)
                with editor.edits(coefs, sources), _replay_layers(editor.layers, layer_out, start, n_rows):
                    out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                    loss = answer_loss(model, editor.adapter, out.last_hidden_state, batch,
                                       objective).double().cpu().numpy()
                dL[k, chunk] = loss[1:] - loss[0]
                bar.update(1)
            del sources, layer_out
        bar.close()
    finally:
        model.train(was_training)
    return dL, clean


def _record_layer(store: list, index: int, module, args, output) -> None:
    if isinstance(output, tuple):
        store[index] = (output[0].detach(),) + tuple(output[1:])
    else:
        store[index] = output.detach()


@contextlib.contextmanager
def _replay_layers(layers, outputs: list, start: int, n_rows: int):
    """Layers < start return their recorded clean output (expanded to n_rows) instead of running."""
    originals = []
    for i in range(start):
        layer, recorded = layers[i], outputs[i]

        def forward(*args, _out=recorded, **kwargs):
            if isinstance(_out, tuple):
                return (_out[0].expand(n_rows, *_out[0].shape[1:]),) + _out[1:]
            return _out.expand(n_rows, *_out.shape[1:])

        originals.append(layer)
        layer.forward = forward
    try:
        yield
    finally:
        for layer in originals:
            del layer.forward  # the instance attribute shadowed the class method
