"""Edge edits: forward hooks that feed destination d the input x_d - sum_u c_(u,d) * O_u.

One mechanism for every command that changes edges: exact ablation (`validate`), scaling and
removal (`intervene`), and anything later. An edit is (edge, coefficient); a coefficient is a
float or a tensor [batch] (one value per batch row, e.g. 1 in the row that removes that edge
and 0 elsewhere). Sources O_u are either given (`sources`: name -> [1 or batch, pos, d_model],
recorded in a clean forward) or captured by hooks in the SAME forward: sources always come
before their destinations in the residual order, so this also works with a KV cache (every
forward step subtracts the sources of its own new positions).

Where an edit acts (nodes.py): a block destination (attention block, MLP, logits) gets its
norm's input edited; a q/k/v destination feeds only that projection norm(x - sub); a per-head
destination replaces only its head's (or kv group's) slice of the projection's output.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterable, Sequence

import torch

from circuitdiff.engine.nodes import ModelNodes, SourceGroup, first_tensor
from circuitdiff.graph import Edge


class EdgeEditor:
    """Edits of one model's edges at one granularity (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, granularity: str = "block"):
        self.model = model
        self.nodes = ModelNodes(model, granularity)
        self.adapter, self.shape, self.graph, self.layers = (self.nodes.adapter, self.nodes.shape, self.nodes.graph,
                                                             self.nodes.layers)

    # ---------------------------------------------------------- sources
    def source_hooks(self, names: Iterable[str], store: dict) -> list:
        """Register hooks writing each named source's output [batch, pos, d_model] into `store`."""
        wanted: dict[SourceGroup, list[str]] = {}
        for name in sorted(set(names), key=self.graph.src_index.__getitem__):
            wanted.setdefault(self.nodes.source(name), []).append(name)
        handles = []
        for group, group_names in wanted.items():
            hook = partial(self._store, store, group, group_names)
            if group.reads == "output":
                handles.append(group.module.register_forward_hook(hook))
            else:
                handles.append(group.module.register_forward_pre_hook(hook))
        return handles

    def _store(self, store: dict, group: SourceGroup, names: list[str], module, args, output=None) -> None:
        inputs = args[0] if group.reads != "output" else None
        values = self.nodes.read_source(group, inputs, None if output is None else first_tensor(output))
        for name in names:
            store[name] = values[:, group.names.index(name)]

    # ----------------------------------------------------------- edits
    @contextlib.contextmanager
    def edits(self, edits: Sequence[tuple[Edge, float | torch.Tensor]], sources: dict[str, torch.Tensor] | None = None):
        """Context in which every forward of the model applies `edits` (see the module docstring)."""
        by_dst: dict[str, list[tuple[str, float | torch.Tensor]]] = {}
        for edge, coef in edits:
            by_dst.setdefault(edge.dst, []).append((edge.src, coef))
        live = sources is None
        store: dict[str, torch.Tensor] = {} if live else sources
        handles = self.source_hooks({s for pairs in by_dst.values() for s, _ in pairs}, store) if live else []
        saved: dict[int, torch.Tensor] = {}
        try:
            for dst, pairs in by_dst.items():
                group = self.nodes.destination(dst)
                subtract = partial(_subtract, store, pairs)
                if group.projection is None:
                    handles.append(group.norm.register_forward_pre_hook(partial(_edit_input, subtract)))
                else:
                    handles += self._projection_edit(dst, subtract, saved)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if live:
                store.clear()

    def _projection_edit(self, dst: str, subtract, saved: dict) -> list:
        """q/k/v destination (qkv) or one head / kv group (head): the projection sees norm(x - sub)."""
        group = self.nodes.destination(dst)
        norm, layer, proj = group.norm, group.layer, group.projection
        handles = []
        if layer not in saved:  # the pre-norm input of this attention block, unedited
            saved[layer] = None
            handles.append(norm.register_forward_pre_hook(partial(_save_input, saved, layer)))
        if not group.per_head:

            def feed(module, args):
                return (norm.forward(subtract(saved[layer])),) + tuple(args[1:])

            handles.append(proj.register_forward_pre_hook(feed))
            return handles
        index, dh = group.names.index(dst), self.shape.head_dim

        def replace(module, args, output):
            fresh = module.forward(norm.forward(subtract(saved[layer])))
            output = output.clone()
            output[..., index * dh : (index + 1) * dh] = fresh[..., index * dh : (index + 1) * dh]
            return output

        handles.append(proj.register_forward_hook(replace))
        return handles


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
