"""Edge attribution patching on a native Hugging Face model: one forward, one backward.

For every edge (source u -> destination d) of the residual graph (graph.py, nodes.py):

    W[b, d, u] = - < dL_b/dx_d , O_u >      summed over positions and hidden dims

- O_u (forward): what source u adds to the residual stream. Forward hooks copy it into one
  buffer per device, [batch, n_src, pos, d_model], in the score dtype (float32; float64 for
  float64 models). Hooks overwrite, never add, so a recomputation (gradient checkpointing)
  changes nothing. Padded positions are stored as 0.
- dL/dx_d (backward): the gradient that reaches d's own input, not the residual stream. A
  forward pre-hook hands d a fresh view of its input and hooks that view: its gradient is
  exactly what flows back through d (the residual branch that bypasses d keeps the original
  tensor). For q/k/v and per-head destinations the gradient is taken after the norm (at the
  projection's input, or per head at its output) and mapped back through the norm's
  vector-Jacobian product, recomputed with the norm module itself so any norm works.
- As each destination's gradient arrives it is contracted at once with the sources that
  precede it and dropped: memory is O(n_src x pos x d_model) plus the model's own activations.

Parameters are frozen; the embedding output is the only leaf that needs a gradient. The state
of one forward+backward lives in a `_Pass` made for that call, not on the attributor.

EAP-IG (method "eap-ig"): one forward without gradients fills the source buffers with the clean
O_u; then, with the buffers frozen, K forward+backward passes run with the embedding output
scaled by the quadrature point t, each contracting its dL/dx_d(t) with the clean O_u into W,
and W is their weighted sum (ig_points: midpoint, Gauss-Legendre or right-end rule on [0, 1]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.utils.checkpoint

from circuitdiff.choices import DEFAULT_IG_RULE, DEFAULT_IG_STEPS, IG_RULES, METHODS, check_choice
from circuitdiff.engine.batch import Batch
from circuitdiff.errors import UserError
from circuitdiff.engine.nodes import DestGroup, ModelNodes, SourceGroup, first_tensor
from circuitdiff.engine.objectives import answer_loss, check_objective, score_dtype_for


@dataclass
class _Pass:
    """What one forward+backward needs: the padding mask, the source buffers and the scores."""

    mask: torch.Tensor  # [batch, pos]
    buffers: dict  # device -> [batch, n_sources_there, pos, d_model]
    W: torch.Tensor  # [batch, n_dst, n_src]
    norm_inputs: dict = field(default_factory=dict)  # layer -> the attention norm's input (split destinations)
    leaf: torch.Tensor | None = None  # the embedding output, the one tensor that requires grad
    capture: bool = True  # source hooks fill the buffers (off in the integrated-gradient steps: they keep the clean ones)
    embed_scale: float = 1.0  # the embedding output is multiplied by this (integrated gradients: the path's t)


class EdgeAttributor:
    """Installs the hooks for one model and granularity; `scores(batch)` runs one forward+backward."""

    def __init__(self, model: torch.nn.Module, granularity: str = "block", gradient_checkpointing: bool = False,
                 objective: str = "nll", method: str = "eap", ig_steps: int = DEFAULT_IG_STEPS,
                 ig_rule: str = DEFAULT_IG_RULE):
        self.model = model
        self.objective = check_objective(objective)
        self.method = check_choice("method", method, METHODS)
        self.ig_points = ig_points(ig_steps, ig_rule) if method == "eap-ig" else []
        self.nodes = ModelNodes(model, granularity)
        self.adapter, self.shape, self.graph = self.nodes.adapter, self.nodes.shape, self.nodes.graph
        self.gradient_checkpointing = gradient_checkpointing
        self.score_dtype = score_dtype_for(next(model.parameters()).dtype)
        self._n_prev = self.graph.n_sources_before_dst.tolist()
        self._place_sources()

    # ------------------------------------------------------------------ run
    def scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [batch, n_dst, n_src] on CPU in the score dtype, objective [batch]) for one batch.

        eap: one forward + backward. eap-ig: one clean forward fills the source buffers with the clean O_u,
        then one forward + backward per quadrature point t with the embedding scaled by t; W is the weighted
        sum of the steps' contractions. The objective returned is the clean one in both."""
        with self.hooked(batch) as state:
            if not self.ig_points:
                loss = self._objective(batch)
                torch.autograd.grad(loss.sum(), state.leaf)
                return state.W.cpu(), loss.detach().cpu()
            with torch.no_grad():
                loss = self._objective(batch)  # the clean sources; no gradient reaches a tap
            state.capture = False
            total = torch.zeros_like(state.W)
            for t, weight in self.ig_points:
                state.embed_scale = t
                state.W.zero_()
                torch.autograd.grad(self._objective(batch).sum(), state.leaf)
                total += weight * state.W
        return total.cpu(), loss.detach().cpu()

    def _objective(self, batch: Batch) -> torch.Tensor:
        out = self.nodes.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return answer_loss(self.model, self.adapter, out.last_hidden_state, batch, self.objective)

    @contextlib.contextmanager
    def hooked(self, batch: Batch):
        """The model with every hook of one pass installed (parameters frozen, eval mode, gradients on).

        Yields the pass state; a forward inside fills the source buffers, a backward to state.leaf fills W.
        """
        n_batch, n_pos = batch.input_ids.shape
        d = self.shape.d_model
        buffers = {dev: torch.zeros(n_batch, n, n_pos, d, dtype=self.score_dtype, device=dev)
                   for dev, n in self._counts.items()}
        W = torch.zeros(n_batch, len(self.graph.dst_names), len(self.graph.src_names), dtype=self.score_dtype,
                        device=next(iter(buffers)))
        state = _Pass(batch.attention_mask, buffers, W)
        with _frozen(self.model), self._hooks(state), _checkpointed(self.nodes.layers, self.gradient_checkpointing):
            yield state

    # ------------------------------------------------------------ buffers
    def _place_sources(self) -> None:
        """Each source's (device, index within that device's buffer); sources keep their global order."""
        self._slot = []  # global source index -> (device, local index)
        self._counts: dict[torch.device, int] = {}
        for group in self.nodes.source_groups:
            device = self.nodes.device_of(group.module)
            for _ in group.names:
                self._slot.append((device, self._counts.get(device, 0)))
                self._counts[device] = self._counts.get(device, 0) + 1
        self._first_global = {}  # device -> global index of its first source (contiguous per device)
        for index, (device, local) in enumerate(self._slot):
            if local == 0:
                self._first_global[device] = index

    def _store(self, state: _Pass, first: int, values: torch.Tensor) -> None:
        """Write sources first..first+n-1 (values: [batch, n, pos, d]); padded positions become 0."""
        device, local = self._slot[first]
        mask = state.mask.to(device)[:, None, :, None].to(self.score_dtype)
        buf = state.buffers[device]
        buf[:, local : local + values.shape[1]] = values.to(device=device, dtype=self.score_dtype) * mask

    def _contract(self, state: _Pass, first_dst: int, grads: torch.Tensor) -> None:
        """W[:, first_dst + i, :n_prev] = -<grads[:, i], O_u> for the destinations first_dst.. (grads [b, m, pos, d])."""
        n_prev = self._n_prev[first_dst]
        n_batch, m = grads.shape[:2]
        for device, buf in state.buffers.items():
            start = self._first_global[device]
            n_here = min(buf.shape[1], n_prev - start)
            if n_here <= 0:
                continue
            g = grads.to(device=device, dtype=self.score_dtype).reshape(n_batch, m, -1)
            src = buf[:, :n_here].reshape(n_batch, n_here, -1)
            part = -torch.bmm(g, src.transpose(1, 2))  # [batch, m, n_here]
            state.W[:, first_dst : first_dst + m, start : start + n_here] = part.to(state.W.device)

    # --------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def _hooks(self, state: _Pass):
        nodes = self.nodes
        embed = nodes.backbone.get_input_embeddings()
        handles = [embed.register_forward_hook(partial(_make_leaf, state))]
        for group in nodes.source_groups:
            if group.reads == "output":
                handles.append(group.module.register_forward_hook(partial(self._capture_output, state, group)))
            else:
                handles.append(group.module.register_forward_pre_hook(partial(self._capture_input, state, group)))
        saved_layers = set()
        for group in nodes.dest_groups:
            if group.projection is None:
                handles.append(group.norm.register_forward_pre_hook(self._tap_input(state, group.first)))
                continue
            if group.layer not in saved_layers:
                saved_layers.add(group.layer)
                handles.append(group.norm.register_forward_pre_hook(partial(_save_norm_input, state, group.layer)))
            if group.per_head:
                handles.append(group.projection.register_forward_hook(self._tap_projection_output(state, group)))
            else:
                handles.append(group.projection.register_forward_pre_hook(self._tap_projection_input(state, group)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _capture_input(self, state: _Pass, group: SourceGroup, module, args):
        if state.capture:
            self._store(state, group.first, self.nodes.read_source(group, args[0].detach(), None, self.score_dtype))

    def _capture_output(self, state: _Pass, group: SourceGroup, module, args, output):
        if state.capture:
            self._store(state, group.first, self.nodes.read_source(group, None, first_tensor(output).detach()))

    def _tap_input(self, state: _Pass, dst: int):
        """Pre-hook: give the module a view of its input whose gradient is contracted as destination dst."""
        return _input_tap(lambda g: self._contract(state, dst, g.detach()[:, None]))

    def _tap_projection_input(self, state: _Pass, group: DestGroup):
        """q/k/v destination (qkv): the gradient at the projection's input, back through the norm."""
        return _input_tap(lambda g: self._contract(state, group.first, _through_norm(state, group, g.detach()[:, None])))

    def _tap_projection_output(self, state: _Pass, group: DestGroup):
        """Per-head destinations: each head's (or kv group's) input gradient, then back through the norm."""
        dh = self.shape.head_dim
        proj = group.projection

        def on_grad(g_out: torch.Tensor) -> None:
            n_batch, n_pos, width = g_out.shape
            n_groups = width // dh
            w = proj.weight.detach().view(n_groups, dh, -1).to(g_out.dtype)  # [groups, dh, d]
            per_group = torch.einsum("btge,ged->bgtd", g_out.detach().view(n_batch, n_pos, n_groups, dh), w)
            self._contract(state, group.first, _through_norm(state, group, per_group))

        def hook(module, args, output):
            if not output.requires_grad:
                return None
            view = output.view_as(output)
            view.register_hook(on_grad)
            return view

        return hook


def _input_tap(on_grad):
    """A pre-hook that hands the module a fresh view of its input and calls on_grad with that view's gradient:
    exactly the gradient that flows back through this module (the residual branch keeps the original tensor)."""

    def hook(module, args):
        x = args[0]
        if not x.requires_grad:
            return None
        view = x.view_as(x)
        view.register_hook(on_grad)
        return (view,) + tuple(args[1:])

    return hook


def _make_leaf(state: _Pass, module, args, output):
    leaf = output.detach() if state.embed_scale == 1.0 else output.detach() * state.embed_scale
    leaf.requires_grad_(True)
    state.leaf = leaf
    return leaf


def ig_points(steps: int, rule: str = DEFAULT_IG_RULE) -> list[tuple[float, float]]:
    """(t, weight) of the quadrature of the integral over t in [0, 1] (choices.IG_RULES)."""
    check_choice("ig rule", rule, IG_RULES)
    if steps < 1:
        raise UserError(f"ig steps {steps} must be >= 1")
    if rule == "gauss":
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(steps)
        return [(float((xi + 1) / 2), float(wi / 2)) for xi, wi in zip(x, w)]
    if rule == "midpoint":
        return [((k + 0.5) / steps, 1.0 / steps) for k in range(steps)]
    return [(k / steps, 1.0 / steps) for k in range(1, steps + 1)]


def _save_norm_input(state: _Pass, layer: int, module, args):
    state.norm_inputs[layer] = args[0].detach()


def _through_norm(state: _Pass, group: DestGroup, grads: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of the group's norm at its saved input for m cotangents: [b, m, pos, d] -> same."""
    x = state.norm_inputs[group.layer]
    m = grads.shape[1]
    with torch.enable_grad():
        xs = x.unsqueeze(1).expand(-1, m, -1, -1).clone().requires_grad_(True)
        # .forward, not __call__: the norm's own hooks (ours included) must not run again here
        (g_x,) = torch.autograd.grad(group.norm.forward(xs), xs, grads.to(x.dtype))
    return g_x


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """Parameters without gradients and the model in eval mode, restored afterwards; gradients on."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False)
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def _checkpointed(layers, enabled: bool):
    """Optional activation checkpointing per decoder layer (non-reentrant, model stays in eval mode)."""
    if not enabled:
        yield
        return
    originals = []
    for layer in layers:
        original = layer.forward
        originals.append((layer, original))

        def forward(*args, _original=original, **kwargs):
            return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer, original in originals:
            layer.forward = original
