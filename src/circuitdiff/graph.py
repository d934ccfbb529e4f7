"""The residual graph: node names, their order, and which edges exist.

Names (layers 0-based), in residual-stream order:

- sources: ``embed``, ``attn.{l}`` (``attn.{l}.h{h}`` at head granularity), ``mlp.{l}``
- destinations: ``attn.{l}`` (block), ``attn.{l}.q|k|v`` (qkv),
  ``attn.{l}.h{h}.q`` and ``attn.{l}.kv{g}.k|v`` (head), ``mlp.{l}``, ``logits``

An edge (source u -> destination d) exists when u writes to the residual stream
before d reads it: every source of an earlier layer, the embedding, and for an
MLP destination also the attention block of its own layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from circuitdiff.errors import UserError

GRANULARITIES = ("block", "qkv", "head")


@dataclass(frozen=True)
class Graph:
    n_layers: int
    granularity: str = "block"
    n_heads: int = 1
    n_kv_heads: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    # --- sources -------------------------------------------------------
    def attn_source_names(self, layer: int) -> list[str]:
        if self.granularity == "head":
            return [f"attn.{layer}.h{h}" for h in range(self.n_heads)]
        return [f"attn.{layer}"]

    @cached_property
    def src_names(self) -> list[str]:
        names = ["embed"]
        for layer in range(self.n_layers):
            names += self.attn_source_names(layer)
            names.append(f"mlp.{layer}")
        return names

    # --- destinations --------------------------------------------------
    def attn_dest_names(self, layer: int) -> list[str]:
        if self.granularity == "block":
            return [f"attn.{layer}"]
        if self.granularity == "qkv":
            return [f"attn.{layer}.{p}" for p in "qkv"]
        q = [f"attn.{layer}.h{h}.q" for h in range(self.n_heads)]
        k = [f"attn.{layer}.kv{g}.k" for g in range(self.n_kv_heads)]
        v = [f"attn.{layer}.kv{g}.v" for g in range(self.n_kv_heads)]
        return q + k + v

    @cached_property
    def dst_names(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += self.attn_dest_names(layer)
            names.append(f"mlp.{layer}")
        names.append("logits")
        return names

    # --- indices -------------------------------------------------------
    @cached_property
    def src_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.src_names)}

    @cached_property
    def dst_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.dst_names)}

    def n_sources_before_attn(self, layer: int) -> int:
        """How many sources (a prefix of src_names) feed layer `layer`'s attention."""
        return 1 + layer * (len(self.attn_source_names(0)) + 1)

    def n_sources_before_mlp(self, layer: int) -> int:
        return self.n_sources_before_attn(layer) + len(self.attn_source_names(0))

    @cached_property
    def n_sources_before_dst(self) -> np.ndarray:
        """For each destination, the length of the source prefix that can reach it."""
        out = []
        for layer in range(self.n_layers):
            out += [self.n_sources_before_attn(layer)] * len(self.attn_dest_names(layer))
            out.append(self.n_sources_before_mlp(layer))
        out.append(len(self.src_names))
        return np.asarray(out, dtype=np.int64)

    @cached_property
    def edge_mask(self) -> np.ndarray:
        """bool [n_dst, n_src]; False marks an impossible edge (always stored as 0)."""
        n_prev = self.n_sources_before_dst
        return np.arange(len(self.src_names))[None, :] < n_prev[:, None]

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())


_NODE = re.compile(r"^(?P<kind>embed|attn|mlp|logits)(?:\.(?P<layer>\d+))?(?:\.(?P<rest>.+))?$")


def parse_node(name: str) -> tuple[str, int | None, str | None]:
    """``'attn.3.q'`` -> ``('attn', 3, 'q')``; ``'embed'`` -> ``('embed', None, None)``."""
    match = _NODE.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a circuitdiff node name")
    layer = match["layer"]
    return match["kind"], (int(layer) if layer is not None else None), match["rest"]


def node_position(name: str, n_layers: int) -> float:
    """Depth of a node along the residual stream, for plotting: embed=0, attn.l=l+1, mlp.l=l+1.5, logits=L+1."""
    kind, layer, _ = parse_node(name)
    if kind == "embed":
        return 0.0
    if kind == "logits":
        return float(n_layers + 1)
    return layer + 1.0 + (0.5 if kind == "mlp" else 0.0)


def dst_layer(dst: str, n_layers: int) -> int:
    """The decoder layer that reads destination `dst` (logits -> n_layers)."""
    kind, layer, _ = parse_node(dst)
    return n_layers if kind == "logits" else int(layer)


# ---------------------------------------------------------------- edges
@dataclass(frozen=True)
class Edge:
    """One edge of the residual graph, by node names."""

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


def as_edge(edge: Edge | str, graph: Graph) -> Edge:
    """An Edge or its 'src->dst' text, checked against `graph`."""
    return parse_edge(edge.name if isinstance(edge, Edge) else str(edge), graph)


def all_edges(graph: Graph) -> list[Edge]:
    """Every real edge, destinations in residual order, sources in order within each."""
    return [Edge(graph.src_names[u], graph.dst_names[d]) for d, u in zip(*np.nonzero(graph.edge_mask))]


def edge_index(edges: list[Edge], graph: Graph) -> tuple[list[int], list[int]]:
    """(destination rows, source columns) of `edges` in W [.., n_dst, n_src]."""
    return [graph.dst_index[e.dst] for e in edges], [graph.src_index[e.src] for e in edges]
