"""Where each node of the residual graph lives in a Hugging Face model, and how to read it.

`ModelNodes(model, granularity)` is the one lookup from graph names (graph.py) to modules,
used by the attribution hooks and by the edge edits alike:

- sources, in groups that one hook reads at once (`SourceGroup`):
  ``embed``: the input of layer 0's attention norm (a forward pre-hook);
  ``attn.{l}``: the output of the adapter's ``attn_out`` module (first element of a tuple);
  ``attn.{l}.h{h}`` (head granularity): head h's share of o_proj's output, computed from
  o_proj's input (one group holds every head of a layer);
  ``mlp.{l}``: the output of ``mlp_out``.
- destinations (`DestGroup`): the tensor that enters a block's pre-norm. ``attn.{l}``, ``mlp.{l}``
  and ``logits`` are the inputs of the attention norm, the MLP norm and the final norm. The
  q/k/v destinations (qkv) and the per-head / per-kv-group pieces (head) read the attention
  norm's input too, but reach only one projection (or one slice of a projection's output).

Head granularity needs per-head sources that add up to the block output, which holds only when
nothing nonlinear follows o_proj (`Adapter.heads_are_additive`) and o_proj has no bias; the checks
are here, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitdiff.errors import UserError
from circuitdiff.graph import GRANULARITIES, Graph
from circuitdiff.models.adapters import Adapter, Shape, adapter_for, get_module, model_shape


def first_tensor(output) -> torch.Tensor:
    """A module's output, or the first element when it returns a tuple (attention blocks do)."""
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class SourceGroup:
    """Sources first..first+len(names)-1, read by one hook on `module`.

    reads: "input" (the module's first positional input), "output" (its output, the first
    element of a tuple) or "heads" (o_proj: every head's share of its output, from its input).
    """

    first: int
    names: tuple[str, ...]
    module: torch.nn.Module
    reads: str


@dataclass(frozen=True)
class DestGroup:
    """Destinations first..first+len(names)-1 behind the pre-norm `norm`.

    projection None: the destination is the norm's input itself (one name). Otherwise the
    names are the q, k or v input of `projection` (one name at qkv granularity) or one per
    head / kv group of its output (head granularity, `per_head` True).
    """

    first: int
    names: tuple[str, ...]
    layer: int | None  # the decoder layer (None for logits)
    norm: torch.nn.Module
    projection: torch.nn.Linear | None = None
    per_head: bool = False


class ModelNodes:
    """The graph of one model at one granularity, and the module behind every node."""

    def __init__(self, model: torch.nn.Module, granularity: str = "block"):
        if granularity not in GRANULARITIES:
            raise UserError(f"granularity {granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        self.model = model
        self.adapter: Adapter = adapter_for(model)
        if granularity == "head" and not self.adapter.heads_are_additive:
            raise UserError(
                f"granularity 'head' is not defined for {self.adapter.name}: a norm after o_proj mixes the heads; "
                "use --granularity block or qkv"
            )
        self.shape: Shape = model_shape(model, self.adapter)
        self.graph = Graph(self.shape.n_layers, granularity, self.shape.n_heads, self.shape.n_kv_heads)
        self.layers = get_module(model, self.adapter.layers)
        self.backbone = get_module(model, self.adapter.backbone)
        self.final_norm = get_module(model, self.adapter.final_norm)
        if granularity == "head" and any(self.projection(l, "o").bias is not None for l in range(self.shape.n_layers)):
            raise UserError("granularity 'head' needs an o_proj without bias (the bias belongs to no head, so head "
                            "scores would not add up to the block's); use --granularity block or qkv")
        self.source_groups = self._source_groups()
        self.dest_groups = self._dest_groups()
        self._source_of = {name: g for g in self.source_groups for name in g.names}
        self._dest_of = {name: g for g in self.dest_groups for name in g.names}

    def module(self, layer: int, field: str) -> torch.nn.Module:
        """The module at the adapter's path `field` (e.g. "attn_norm") of decoder layer `layer`."""
        return get_module(self.layers[layer], getattr(self.adapter, field))

    def attention(self, layer: int) -> torch.nn.Module:
        return self.module(layer, "attn")

    def projection(self, layer: int, which: str) -> torch.nn.Linear:
        """The q, k, v or o projection of layer `layer`'s attention."""
        return get_module(self.attention(layer), getattr(self.adapter, f"{which}_proj"))

    # ------------------------------------------------------------ lookups
    def source(self, name: str) -> SourceGroup:
        if name not in self._source_of:
            raise UserError(f"{name!r} is not a source node at granularity {self.graph.granularity}")
        return self._source_of[name]

    def destination(self, name: str) -> DestGroup:
        if name not in self._dest_of:
            raise UserError(f"{name!r} is not a destination node at granularity {self.graph.granularity}")
        return self._dest_of[name]

    # ------------------------------------------------------------ reading sources
    def read_source(self, group: SourceGroup, inputs: torch.Tensor | None, output: torch.Tensor | None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """The group's outputs [batch, n_names, pos, d_model] from what its hook saw.

        inputs: the module's first positional input (pre-hooks and "heads"); output: its output's
        first tensor ("output" groups). "input"/"output" keep the model's dtype unless `dtype` is
        given; "heads" computes in `dtype` (default: the model's).
        """
        if group.reads == "heads":
            return self.head_outputs(inputs, group.module, dtype)
        values = (inputs if group.reads == "input" else output)[:, None]
        return values if dtype is None else values.to(dtype)

    def head_outputs(self, z: torch.Tensor, o_proj: torch.nn.Linear, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Head h's share of o_proj's output, z[..., h] @ W_O[:, h]^T, for every head: [batch, n_heads, pos, d_model].

        z: o_proj's input [batch, pos, n_heads * head_dim]. o_proj's bias (if any) belongs to no head.
        """
        dtype = dtype or z.dtype
        H, dh = self.shape.n_heads, self.shape.head_dim
        n_batch, n_pos, _ = z.shape
        w = o_proj.weight.to(dtype).view(-1, H, dh)  # [d, H, dh]
        return torch.einsum("bthe,dhe->bhtd", z.to(dtype).view(n_batch, n_pos, H, dh), w)

    def device_of(self, module: torch.nn.Module) -> torch.device:
        """Where a module's parameters live (device_map may spread layers over devices)."""
        param = next(module.parameters(), None)
        return param.device if param is not None else next(self.model.parameters()).device

    # ------------------------------------------------------------ the groups
    def _source_groups(self) -> list[SourceGroup]:
        g = self.graph
        groups = [SourceGroup(0, ("embed",), self.module(0, "attn_norm"), "input")]
        for layer in range(self.shape.n_layers):
            names = tuple(g.attn_source_names(layer))
            first = g.n_sources_before_attn(layer)
            if g.granularity == "head":
                groups.append(SourceGroup(first, names, self.projection(layer, "o"), "heads"))
            else:
                groups.append(SourceGroup(first, names, self.module(layer, "attn_out"), "output"))
            groups.append(SourceGroup(g.n_sources_before_mlp(layer), (f"mlp.{layer}",), self.module(layer, "mlp_out"), "output"))
        return groups

    def _dest_groups(self) -> list[DestGroup]:
        g = self.graph
        groups: list[DestGroup] = []
        first = 0
        for layer in range(self.shape.n_layers):
            attn_norm = self.module(layer, "attn_norm")
            names = g.attn_dest_names(layer)
            if g.granularity == "block":
                groups.append(DestGroup(first, tuple(names), layer, attn_norm))
            elif g.granularity == "qkv":
                for i, which in enumerate("qkv"):
                    groups.append(DestGroup(first + i, (names[i],), layer, attn_norm, self.projection(layer, which)))
            else:
                H, KV = self.shape.n_heads, self.shape.n_kv_heads
                for which, start, n in (("q", 0, H), ("k", H, KV), ("v", H + KV, KV)):
                    groups.append(DestGroup(first + start, tuple(names[start : start + n]), layer, attn_norm,
                                            self.projection(layer, which), per_head=True))
            first += len(names)
            groups.append(DestGroup(first, (f"mlp.{layer}",), layer, self.module(layer, "mlp_norm")))
            first += 1
        groups.append(DestGroup(first, ("logits",), None, self.final_norm))
        return groups
