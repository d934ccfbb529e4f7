"""Stage `validate`: EAP against exact edge ablation on the same samples.

EAP scores an edge (u -> d) with the first-order estimate W[d, u] = -<dL/dx_d, O_u> of the
loss change when the edge is removed. This module measures that loss change exactly:

    dL[d, u] = L(edge removed) - L(clean)

where "edge removed" (zero ablation) means destination d receives x_d - O_u instead of x_d
and every other node is unchanged: the source's output is subtracted from THAT destination's
input only; downstream of d everything is recomputed normally. L is the engine's loss
(`answer_loss`: mean NLL of answer_ids[:cut_len] given the prompt), per sample.

How (one sample at a time):
1. one clean forward records every needed source output O_u [1, pos, d_model] and every
   decoder layer's output;
2. the sample is replicated along the batch axis: row 0 stays clean, row r removes edge r
   (a forward pre-hook on d's norm subtracts O_u from its input in that row only). For a q/k/v
   (or per-head) destination the subtraction happens only in that projection's path: the
   projection is fed norm(x - O_u). dL = loss[row r] - loss[row 0] of the same forward;
3. edges are sorted by destination layer; a batch whose earliest destination is in layer l
   replays the recorded clean outputs of layers < l instead of recomputing them (nothing
   before d changes when only d's input is edited).

`EdgeEditor` (the hooks) is shared with `circuitdiff.intervene`, which scales edges instead
of removing them and captures the sources in the same forward (so it works with a KV cache).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from circuitdiff import io, rundir
from circuitdiff.engine import answer_loss, make_batch
from circuitdiff.errors import UserError
from circuitdiff.graph import GRANULARITIES, Graph, parse_node
from circuitdiff.models.adapters import adapter_for, get_module, model_shape

ABLATION_CONVENTION = (
    "zero ablation of one edge u->d: d receives x_d - O_u (O_u = u's clean output, all positions), "
    "every other node unchanged; dL = L(edge removed) - L(clean)"
)
LOSS_CONVENTION = "per sample: mean NLL of answer_ids[:cut_len] given the prompt (the engine's answer_loss)"
EAP_CONVENTION = "EAP W[d,u] = -<dL/dx_d, O_u> summed over positions and hidden dims; W > 0: removing the edge raises the loss"
DEFAULT_SIGN_THRESHOLD = 1e-5


# ---------------------------------------------------------------- edges
@dataclass(frozen=True)
class Edge:
    """One edge of the residual graph, by node names (see graph.py)."""

    src: str
    dst: str

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"


def parse_edge(text: str, graph: Graph) -> Edge:
    """'attn.3->mlp.5' -> Edge, checked against `graph` (UserError for an unknown or impossible edge)."""
    src, sep, dst = text.strip().partition("->")
    src, dst = src.strip(), dst.strip()
    if not sep or not src or not dst:
        raise UserError(f"edge {text!r} is not of the form 'src->dst' (e.g. 'attn.3->mlp.5')")
    if src not in graph.src_index:
        raise UserError(f"edge {text!r}: unknown source {src!r} at granularity {graph.granularity} "
                        f"(sources: embed, {graph.src_names[1]}, ..., {graph.src_names[-1]})")
    if dst not in graph.dst_index:
        raise UserError(f"edge {text!r}: unknown destination {dst!r} at granularity {graph.granularity} "
                        f"(destinations: {graph.dst_names[0]}, ..., {graph.dst_names[-1]})")
    if not graph.edge_mask[graph.dst_index[dst], graph.src_index[src]]:
        raise UserError(f"edge {text!r} does not exist: {src} does not come before {dst} in the residual stream")
    return Edge(src, dst)


def all_edges(graph: Graph) -> list[Edge]:
    """Every real edge, destinations in residual order, sources in order within each."""
    return [Edge(graph.src_names[u], graph.dst_names[d]) for d, u in zip(*np.nonzero(graph.edge_mask))]


def dst_layer(dst: str, n_layers: int) -> int:
    """The decoder layer that reads destination `dst` (logits -> n_layers)."""
    kind, layer, _ = parse_node(dst)
    return n_layers if kind == "logits" else int(layer)


# ---------------------------------------------------------------- hooks
class EdgeEditor:
    """Forward hooks that feed destination d the input x_d - sum_u c_(u,d) * O_u.

    `edits(...)` takes (edge, coefficient) pairs; a coefficient is a float or a tensor
    [batch] (one value per batch row, e.g. 1 in the row that removes that edge, 0 elsewhere).
    Sources O_u: either given (`sources`: name -> [1 or batch, pos, d_model], e.g. recorded in a
    clean forward), or captured by forward hooks in the SAME forward (sources always precede
    their destinations in the residual order, so this works with a KV cache: every forward
    step subtracts the sources of its own new positions).
    """

    def __init__(self, model: torch.nn.Module, granularity: str = "block"):
        self.model = model
        self.adapter = adapter_for(model)
        self.shape = model_shape(model, self.adapter)
        if granularity not in GRANULARITIES:
            raise UserError(f"granularity {granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        if granularity == "head" and not self.adapter.heads_are_additive:
            raise UserError(f"granularity 'head' is not defined for {self.adapter.name}: a norm after o_proj mixes the "
                            "heads; use block or qkv")
        self.graph = Graph(self.shape.n_layers, granularity, self.shape.n_heads, self.shape.n_kv_heads)
        self.layers = get_module(model, self.adapter.layers)

    # ---------------------------------------------------------- sources
    def source_hooks(self, names: Iterable[str], store: dict) -> list:
        """Register hooks writing each named source's output [batch, pos, d_model] into `store`."""
        handles = []
        a = self.adapter
        for name in sorted(set(names), key=self.graph.src_index.__getitem__):
            kind, layer, rest = parse_node(name)
            if kind == "embed":
                module = get_module(self.layers[0], a.attn_norm)
                handles.append(module.register_forward_pre_hook(partial(_store_input, store, name)))
            elif kind == "attn" and rest is not None:
                o_proj = get_module(get_module(self.layers[layer], a.attn), a.o_proj)
                handles.append(o_proj.register_forward_pre_hook(partial(self._store_head, store, name, int(rest[1:]))))
            else:
                module = get_module(self.layers[layer], a.attn_out if kind == "attn" else a.mlp_out)
                handles.append(module.register_forward_hook(partial(_store_output, store, name)))
        return handles

    def _store_head(self, store: dict, name: str, head: int, module, args) -> None:
        """Head h's share of o_proj's output: z[..., h] @ W_O[:, h]^T."""
        dh = self.shape.head_dim
        z = args[0][..., head * dh : (head + 1) * dh]
        store[name] = z @ module.weight[:, head * dh : (head + 1) * dh].T

    # ----------------------------------------------------------- edits
    @contextlib.contextmanager
    def edits(self, edits: Sequence[tuple[Edge, float | torch.Tensor]], sources: dict[str, torch.Tensor] | None = None):
        """Context in which every forward of the model applies `edits` (see the class docstring)."""
        by_dst: dict[str, list[tuple[str, float | torch.Tensor]]] = {}
        for edge, coef in edits:
            by_dst.setdefault(edge.dst, []).append((edge.src, coef))
        live = sources is None
        store: dict[str, torch.Tensor] = {} if live else sources
        handles = self.source_hooks({s for pairs in by_dst.values() for s, _ in pairs}, store) if live else []
        saved: dict[int, torch.Tensor] = {}
        a = self.adapter
        try:
            for dst, pairs in by_dst.items():
                kind, layer, rest = parse_node(dst)
                subtract = partial(_subtract, store, pairs)
                if kind == "logits":
                    handles.append(get_module(self.model, a.final_norm).register_forward_pre_hook(partial(_edit_input, subtract)))
                elif kind == "mlp":
                    module = get_module(self.layers[layer], a.mlp_norm)
                    handles.append(module.register_forward_pre_hook(partial(_edit_input, subtract)))
                elif rest is None:
                    module = get_module(self.layers[layer], a.attn_norm)
                    handles.append(module.register_forward_pre_hook(partial(_edit_input, subtract)))
                else:
                    handles += self._projection_edit(layer, rest, subtract, saved)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if live:
                store.clear()

    def _projection_edit(self, layer: int, rest: str, subtract, saved: dict) -> list:
        """q/k/v destination (qkv) or one head / kv group (head): the projection sees norm(x - sub)."""
        a = self.adapter
        norm = get_module(self.layers[layer], a.attn_norm)
        attn = get_module(self.layers[layer], a.attn)
        handles = []
        if layer not in saved:  # the pre-norm input of this attention block, unedited
            saved[layer] = None
            handles.append(norm.register_forward_pre_hook(partial(_save_input, saved, layer)))
        parts = rest.split(".")
        proj = get_module(attn, getattr(a, f"{parts[-1]}_proj"))
        if len(parts) == 1:

            def feed(module, args):
                return (norm.forward(subtract(saved[layer])),) + tuple(args[1:])

            handles.append(proj.register_forward_pre_hook(feed))
            return handles
        index, dh = int(parts[0].lstrip("hkv")), self.shape.head_dim

        def replace(module, args, output):
            fresh = module.forward(norm.forward(subtract(saved[layer])))
            output = output.clone()
            output[..., index * dh : (index + 1) * dh] = fresh[..., index * dh : (index + 1) * dh]
            return output

        handles.append(proj.register_forward_hook(replace))
        return handles


def _store_input(store, name, module, args):
    store[name] = args[0]


def _store_output(store, name, module, args, output):
    store[name] = output[0] if isinstance(output, tuple) else output


def _save_input(saved, layer, module, args):
    saved[layer] = args[0]


def _edit_input(subtract, module, args):
    return (subtract(args[0]),) + tuple(args[1:])


def _subtract(store: dict, pairs: list, x: torch.Tensor) -> torch.Tensor:
    """x - sum over (src, coef) of coef * O_src; coef a float or a tensor [batch]."""
    for src, coef in pairs:
        out = store[src].to(x.dtype)
        if isinstance(coef, torch.Tensor):
            coef = coef.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        x = x - coef * out
    return x


# ---------------------------------------------------------------- exact ablation
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


@torch.no_grad()
def exact_edge_effects(
    model: torch.nn.Module,
    samples: list[dict],
    edges: Sequence[Edge],
    *,
    granularity: str = "block",
    scale: float = 1.0,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(dL [n_samples, n_edges], clean loss [n_samples]), float64 numpy.

    dL[k, e] = L_k(edge e scaled) - L_k(clean): destination d receives x_d - scale * O_u
    (scale=1: the edge is removed; scale=eps: a small ablation for finite differences).
    `batch_size` rows per forward: one clean row plus batch_size - 1 edges of one sample.
    """
    if batch_size < 2:
        raise UserError(f"batch size {batch_size} must be >= 2 (one clean row plus at least one edge)")
    editor = EdgeEditor(model, granularity)
    graph, adapter = editor.graph, editor.adapter
    for edge in edges:
        parse_edge(edge.name, graph)
    n_layers = editor.shape.n_layers
    order = sorted(range(len(edges)), key=lambda e: (graph.dst_index[edges[e].dst], graph.src_index[edges[e].src]))
    per_chunk = batch_size - 1
    chunks = [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]
    backbone = get_module(model, adapter.backbone)
    device = model.get_input_embeddings().weight.device
    pad_id = getattr(model.config, "pad_token_id", None) or 0
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
                clean[k] = float(answer_loss(model, adapter, out.last_hidden_state, batch)[0])
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
                    loss = answer_loss(model, adapter, out.last_hidden_state, batch).double().cpu().numpy()
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


# ---------------------------------------------------------------- agreement
def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k of |a| and top-k of |b|| / k (edges ranked by absolute value)."""
    k = max(1, min(int(k), len(a)))
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(W: np.ndarray, dL: np.ndarray, sign_threshold: float = DEFAULT_SIGN_THRESHOLD) -> dict:
    """EAP W [n_edges] vs exact dL [n_edges] (same edge order): correlations, sign agreement, top-k overlap."""
    from scipy import stats

    W, dL = np.asarray(W, dtype=np.float64), np.asarray(dL, dtype=np.float64)
    n = len(W)
    out: dict = {"n_edges": n}
    if n >= 3 and np.ptp(W) > 0 and np.ptp(dL) > 0:
        out["spearman"] = float(stats.spearmanr(W, dL).statistic)
        out["pearson"] = float(stats.pearsonr(W, dL).statistic)
        out["spearman_abs"] = float(stats.spearmanr(np.abs(W), np.abs(dL)).statistic)
    else:
        out["spearman"] = out["pearson"] = out["spearman_abs"] = float("nan")
    big = np.abs(dL) > sign_threshold
    out["sign_threshold"] = sign_threshold
    out["n_sign_edges"] = int(big.sum())
    out["sign_agreement"] = float(np.mean(np.sign(W[big]) == np.sign(dL[big]))) if big.any() else float("nan")
    for name, side in (("W_pos", big & (W > 0)), ("W_neg", big & (W < 0))):  # does removal act as EAP predicts?
        out[f"sign_agreement_{name}"] = float(np.mean(np.sign(dL[side]) == np.sign(W[side]))) if side.any() else float("nan")
        out[f"n_{name}"] = int(side.sum())
    out["fraction_dL_positive"] = float(np.mean(dL > 0)) if n else float("nan")
    k5 = max(1, math.ceil(0.05 * n))
    out["top10_overlap"] = topk_overlap(W, dL, 10)
    out["top5pct_k"] = k5
    out["top5pct_overlap"] = topk_overlap(W, dL, k5)
    ratio = np.abs(W[big]) / np.abs(dL[big]) if big.any() else np.array([np.nan])
    out["median_abs_ratio_W_over_dL"] = float(np.median(ratio))
    return out


def summarize(W: np.ndarray, dL: np.ndarray, sign_threshold: float = DEFAULT_SIGN_THRESHOLD, how: str = "") -> dict:
    """Agreement of W and dL [n_samples, n_edges]: of the sample means (main numbers), pooled over every
    (sample, edge) pair (*_pooled), and per sample (*_per_sample lists)."""
    summary = agreement(W.mean(0), dL.mean(0), sign_threshold)
    pooled = agreement(W.ravel(), dL.ravel(), sign_threshold)
    summary.update({f"{k}_pooled": pooled[k] for k in ("spearman", "pearson", "sign_agreement", "n_sign_edges")})
    per_sample = [agreement(W[k], dL[k], sign_threshold) for k in range(len(W))]
    for key in ("spearman", "pearson", "sign_agreement", "top10_overlap"):
        summary[f"{key}_per_sample"] = [p[key] for p in per_sample]
    summary["edges_chosen"] = how
    return summary


# ---------------------------------------------------------------- result
@dataclass
class Validation:
    """Exact ablation vs EAP for a list of edges on the same samples."""

    edges: list[Edge]
    dL: np.ndarray  # [n_samples, n_edges] exact loss change
    W: np.ndarray  # [n_samples, n_edges] EAP score
    clean_loss: np.ndarray  # [n_samples]
    granularity: str
    summary: dict  # agreement of the sample means, plus the pooled (sample, edge) correlations
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        dL_mean, W_mean = self.dL.mean(0), self.W.mean(0)
        return {
            "summary": self.summary,
            "granularity": self.granularity,
            "n_samples": int(self.dL.shape[0]),
            "n_edges": len(self.edges),
            "clean_loss": self.clean_loss.tolist(),
            "conventions": conventions(self.summary.get("sign_threshold", DEFAULT_SIGN_THRESHOLD)),
            "meta": self.meta,
            "edges": [
                {"edge": e.name, "src": e.src, "dst": e.dst, "dL_mean": float(dL_mean[i]), "W_mean": float(W_mean[i]),
                 "dL": self.dL[:, i].tolist(), "W": self.W[:, i].tolist()}
                for i, e in enumerate(self.edges)
            ],
        }  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> "Validation":
        """Read a JSON written by `save` (the per-sample values of every edge)."""
        data = io.read_json(path)
        edges = [Edge(e["src"], e["dst"]) for e in data["edges"]]
        dL = np.array([e["dL"] for e in data["edges"]], dtype=np.float64).T.reshape(data["n_samples"], len(edges))
        W = np.array([e["W"] for e in data["edges"]], dtype=np.float64).T.reshape(data["n_samples"], len(edges))
        return cls(edges, dL, W, np.asarray(data["clean_loss"]), data["granularity"], data["summary"], data.get("meta", {}))

    def save(self, json_path: str | Path, png_path: str | Path | None = None) -> tuple[Path, Path | None]:
        json_path = Path(json_path)
        png_path = Path(png_path) if png_path is not None else json_path.with_suffix(".png")
        io.write_bytes(png_path, scatter_png(self))
        data = self.to_json()
        data["figure"] = png_path.name
        io.write_json(json_path, data)
        return json_path, png_path


def conventions(sign_threshold: float = DEFAULT_SIGN_THRESHOLD) -> dict:
    return {
        "ablation": ABLATION_CONVENTION,
        "loss": LOSS_CONVENTION,
        "eap": EAP_CONVENTION,
        "correlations": "Spearman and Pearson over the chosen edges of the sample-mean dL and sample-mean W "
                        "(*_pooled: over every (sample, edge) pair; *_per_sample: over edges, one value per sample)",
        "sign_agreement": f"fraction of edges with sign(W_mean) == sign(dL_mean) among edges with |dL_mean| > {sign_threshold:g} nats "
                          "(_W_pos / _W_neg: among those with W > 0 / W < 0)",
        "topk_overlap": "|top-k edges by |W_mean| and top-k by |dL_mean|| / k, for k = 10 and k = ceil(5% of the chosen edges)",
    }  # fmt: skip


def choose_edges(graph: Graph, max_edges: int | None, seed: int = 0) -> tuple[list[Edge], str]:
    """(edges, how): every real edge, or a seeded uniform random subset of `max_edges` of them."""
    edges = all_edges(graph)
    if max_edges is None or max_edges >= len(edges):
        return edges, f"all {len(edges)} real edges"
    if max_edges < 1:
        raise UserError(f"--max-edges {max_edges} must be >= 1")
    pick = np.sort(np.random.default_rng(seed).choice(len(edges), size=max_edges, replace=False))
    return [edges[i] for i in pick], f"{max_edges} of {len(edges)} real edges drawn uniformly without replacement (seed {seed})"


DEFAULT_MAX_EDGES = {"block": None, "qkv": 300, "head": 300}


def validate(
    model,
    samples: str | Path | list[dict],
    *,
    granularity: str = "block",
    edges: Sequence[Edge] | None = None,
    max_edges: int | None = -1,
    seed: int = 0,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
    sign_threshold: float = DEFAULT_SIGN_THRESHOLD,
    progress: bool = False,
) -> Validation:
    """Exact ablation dL and EAP W for the chosen edges on `samples`, and their agreement.

    `model`: a spec for `load_model`, a LoadedModel or a Hugging Face causal LM. `edges`: explicit
    edges, else every real edge (max_edges=None) or a seeded random subset of max_edges; the
    default (-1) is every edge at block granularity and 300 random edges at qkv/head.
    """
    from circuitdiff.attribute import as_samples, attribute, resolve_model
    from circuitdiff.models import LoadedModel

    samples = as_samples(samples)
    spec, model, hf = resolve_model(model, dtype, device)
    editor = EdgeEditor(hf, granularity)
    if edges is None:
        limit = DEFAULT_MAX_EDGES[granularity] if max_edges == -1 else max_edges
        edges, how = choose_edges(editor.graph, limit, seed)
    else:
        edges = [parse_edge(e.name if isinstance(e, Edge) else str(e), editor.graph) for e in edges]
        how = f"{len(edges)} given edges"
    if not edges:
        raise UserError("no edges to validate")

    t0 = time.perf_counter()
    attr = attribute(hf, samples, granularity=granularity, batch_size=1)
    t_eap = time.perf_counter() - t0
    g = editor.graph
    rows = [g.dst_index[e.dst] for e in edges]
    cols = [g.src_index[e.src] for e in edges]
    W = attr.scores[:, rows, cols].astype(np.float64)
    t0 = time.perf_counter()
    dL, clean = exact_edge_effects(hf, samples, edges, granularity=granularity, batch_size=batch_size, progress=progress)
    t_exact = time.perf_counter() - t0

    summary = summarize(W, dL, sign_threshold, how)
    param = next(hf.parameters())
    meta = {
        "model": spec,
        "model_type": hf.config.model_type,
        "model_dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "n_layers": editor.shape.n_layers,
        "n_edges_graph": g.n_edges,
        "batch_size": batch_size,
        "seconds_exact": round(t_exact, 3),
        "seconds_eap": round(t_eap, 3),
        "seed": seed,
        "sample_lengths": [len(s["prompt_ids"]) + s["cut_len"] for s in samples],
        "cut_len": [s["cut_len"] for s in samples],
    }
    if isinstance(model, LoadedModel):
        meta["model_info"] = model.info
    return Validation(list(edges), dL, W, clean, granularity, summary, meta)


# ---------------------------------------------------------------- figure
def scatter_png(result: Validation) -> bytes:
    """Exact dL (x) vs EAP W (y), sample means, symlog axes, one colour per destination kind."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    x, y = result.dL.mean(0), result.W.mean(0)
    kinds = np.array([parse_node(e.dst)[0] for e in result.edges])
    both = np.concatenate([np.abs(x), np.abs(y)])
    nonzero = both[both > 0]
    # linear within +-linthresh (a power of ten near the 5% quantile of the values), log outside
    linthresh = 10.0 ** math.floor(math.log10(float(np.quantile(nonzero, 0.05)))) if nonzero.size else 1e-6
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    for kind, colour in (("attn", "tab:blue"), ("mlp", "tab:orange"), ("logits", "tab:green")):
        sel = kinds == kind
        if sel.any():
            ax.scatter(x[sel], y[sel], s=9, alpha=0.6, color=colour, label=f"destination {kind} ({int(sel.sum())})", lw=0)
    lim = float(both.max()) * 1.3 if both.size and both.max() > 0 else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="W = dL")
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.SymmetricalLogLocator(base=10, linthresh=linthresh, subs=[1.0]))
        axis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.tick_params(labelsize=7)
    for label in ax.get_xticklabels():
        label.set_rotation(45)
    ax.axhline(0, color="black", lw=0.4)
    ax.axvline(0, color="black", lw=0.4)
    s = result.summary
    ax.set_title(
        f"{result.meta.get('model', '')}: {result.granularity}, {len(result.edges)} edges, {result.dL.shape[0]} samples\n"
        f"Spearman {s['spearman']:.3f}, Pearson {s['pearson']:.3f}, sign agreement {s['sign_agreement']:.3f}, "
        f"top-10 overlap {s['top10_overlap']:.2f}",
        fontsize=9,
    )
    ax.set_xlabel(f"exact dL = L(edge removed) - L(clean) [nats], mean over samples (zero ablation)\n"
                  f"symlog axes: linear within +-{linthresh:.0e}", fontsize=8)
    ax.set_ylabel("EAP W = -<dL/dx_d, O_u>, mean over samples", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def summary_line(result: Validation) -> str:
    s = result.summary
    return (
        f"{len(result.edges)} edges ({s['edges_chosen']}), granularity={result.granularity}, {result.dL.shape[0]} samples; "
        f"over edges, sample-mean EAP W vs exact zero-ablation dL: Spearman {s['spearman']:.4f}, Pearson {s['pearson']:.4f}, "
        f"Spearman of |.| {s['spearman_abs']:.4f}; sign agreement {s['sign_agreement']:.4f} over the {s['n_sign_edges']} "
        f"edges with |dL| > {s['sign_threshold']:g} nats ({s['sign_agreement_W_pos']:.4f} of the {s['n_W_pos']} with W > 0, "
        f"{s['sign_agreement_W_neg']:.4f} of the {s['n_W_neg']} with W < 0; dL > 0 for {s['fraction_dL_positive']:.4f} "
        f"of all); top-10 overlap {s['top10_overlap']:.2f}, "
        f"top-{s['top5pct_k']} (5%) overlap {s['top5pct_overlap']:.2f}; pooled over (sample, edge): Spearman "
        f"{s['spearman_pooled']:.4f}, Pearson {s['pearson_pooled']:.4f}, sign agreement {s['sign_agreement_pooled']:.4f}; "
        f"per sample: Spearman {_listed(s['spearman_per_sample'])}, sign agreement "
        f"{_listed(s['sign_agreement_per_sample'])} (loss: mean NLL of answer_ids[:cut_len]; "
        f"exact {result.meta['seconds_exact']:.1f} s, EAP {result.meta['seconds_eap']:.1f} s)"
    )


def _listed(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


# ---------------------------------------------------------------- run directory
def run_samples(run_dir: str | Path, role: str, dataset: str, alpha: float, n_samples: int | None) -> tuple[list[dict], dict]:
    """The attribution samples of a run (selection idx order, T_cut), first n_samples of them, and their idx."""
    run = Path(run_dir)
    if role not in rundir.ROLES:
        raise UserError(f"role {role!r} is unknown; use base or tuned")
    gen, sel_path = rundir.generations(run, role, dataset), rundir.selection(run, dataset, alpha)
    for path, stage in ((gen, "generate"), (sel_path, "select")):
        if not path.exists():
            raise UserError(f"{path} does not exist; run the {stage} stage first (circuitdiff run ... --until {stage}) "
                            "or check --run/--dataset/--alpha")
    sel = io.read_json(sel_path)
    rows = {r["idx"]: r for r in io.read_jsonl_tolerant(gen)}
    idx = list(sel.get("idx", []))[: n_samples if n_samples else None]
    if not idx:
        raise UserError(f"{sel_path} selected no samples (no question survived the selection); "
                        "use --model/--samples with a samples file instead")
    missing = [i for i in idx if i not in rows]
    if missing:
        raise UserError(f"{gen} lacks the selected questions {missing[:5]}; re-run the generate stage")
    T_cut = int(sel["T_cut"])
    samples = [{"prompt_ids": rows[i]["prompt_ids"], "answer_ids": rows[i]["answer_ids"], "cut_len": T_cut} for i in idx]
    return samples, {"idx": idx, "T_cut": T_cut, "selection": str(sel_path)}


def run_model_spec(run_dir: str | Path, role: str) -> tuple[str, str]:
    """(model spec, dtype) of `role` from RUN_DIR/manifest.json."""
    path = rundir.manifest(Path(run_dir))
    if not path.exists():
        raise UserError(f"{path} does not exist; pass the directory a `circuitdiff run` wrote")
    config = io.read_json(path).get("config", {})
    spec = (config.get(role) or {}).get("spec")
    if not spec:
        raise UserError(f"{path} names no config.{role}.spec; was it written by `circuitdiff run`?")
    return spec, config.get("dtype", "float32")


def validation_paths(run_dir: str | Path, role: str, dataset: str, alpha: float) -> tuple[Path, Path]:
    folder, tag = Path(run_dir) / "validation" / role / dataset, rundir.alpha_tag(alpha)
    return folder / f"{tag}.json", folder / f"{tag}.png"


def validate_run(run_dir: str | Path, role: str, dataset: str, alpha: float, n_samples: int | None = 4,
                 dtype: str | None = None, **kwargs) -> Validation:
    """`validate` on a run directory: the first n_samples selected samples of `role`, its model from the
    manifest (in the run's dtype unless given); the run/role/dataset/alpha go into the result's meta.
    kwargs go to `validate` (granularity, max_edges, seed, batch_size, device, sign_threshold, progress)."""
    samples, where = run_samples(run_dir, role, dataset, alpha, n_samples)
    spec, run_dtype = run_model_spec(run_dir, role)
    result = validate(spec, samples, dtype=dtype or run_dtype, **kwargs)
    result.meta.update({**where, "run": str(run_dir), "role": role, "dataset": dataset, "alpha": alpha})
    return result


# ---------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "validate",
        help="EAP scores vs exact edge ablation on the same samples (correlations, sign agreement, scatter)",
        description="Remove each chosen edge exactly (zero ablation: d receives x_d - O_u, nothing else changes), "
                    "measure the loss change dL, and compare it with the EAP score W of the same edge. Either "
                    "--model and --samples, or --run with --role/--dataset/--alpha.",
    )
    p.add_argument("--model", help="hub id, local dir, .gguf file, LoRA adapter dir, or smollm2-135m-instruct")
    p.add_argument("--samples", help='JSONL, one {"prompt_ids": [...], "answer_ids": [...], "cut_len": K} per line')
    p.add_argument("--run", help="run directory: samples from selection/ + generations/, model from manifest.json")
    p.add_argument("--role", choices=rundir.ROLES, default="tuned", help="with --run: which model (default tuned)")
    p.add_argument("--dataset", help="with --run: dataset key (e.g. gsm8k)")
    p.add_argument("--alpha", type=float, help="with --run: the alpha of the selection")
    p.add_argument("--n-samples", type=int, default=4, help="with --run: the first N selected samples (default 4)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="block")
    p.add_argument("--max-edges", type=int, default=-1,
                   help="validate a seeded random subset of N edges (default: all edges at block, 300 at qkv/head)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random edge subset (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward: 1 clean + B-1 edges (default 32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], help="default float32 (with --run: the run's dtype)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sign-threshold", type=float, default=DEFAULT_SIGN_THRESHOLD,
                   help=f"sign agreement counts edges with |dL| above this, in nats (default {DEFAULT_SIGN_THRESHOLD:g})")
    p.add_argument("--out", help="output directory (validation.json + validation.png); with --run default "
                                 "RUN_DIR/validation/{role}/{dataset}/alpha={a}.json")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    options = dict(granularity=args.granularity, max_edges=args.max_edges, seed=args.seed, batch_size=args.batch_size,
                   device=args.device, sign_threshold=args.sign_threshold, progress=True)
    if args.run:
        if args.dataset is None or args.alpha is None:
            raise UserError("--run needs --dataset and --alpha (and --role, default tuned)")
        if args.model or args.samples:
            raise UserError("give either --run or --model/--samples, not both")
        result = validate_run(args.run, args.role, args.dataset, args.alpha, args.n_samples, args.dtype, **options)
        json_path, png_path = (validation_paths(args.run, args.role, args.dataset, args.alpha) if not args.out else
                               (Path(args.out) / "validation.json", Path(args.out) / "validation.png"))
    else:
        if not args.model or not args.samples or not args.out:
            raise UserError("give --model, --samples and --out (or --run RUN_DIR --dataset D --alpha A)")
        result = validate(args.model, args.samples, dtype=args.dtype or "float32", **options)
        result.meta.update({"samples": args.samples})
        json_path, png_path = Path(args.out) / "validation.json", Path(args.out) / "validation.png"
    result.save(json_path, png_path)
    print(f"wrote {json_path} and {png_path}: {summary_line(result)}")
    return 0
