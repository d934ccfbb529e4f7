"""Edge attribution patching on a native Hugging Face model: one forward, one backward.

For every edge (source u -> destination d) of the residual graph (see graph.py):

    W[b, d, u] = - < dL_b/dx_d , O_u >      summed over positions and hidden dims

- O_u (forward): what source u adds to the residual stream. Captured by forward
  hooks into one buffer per device, [batch, n_src, pos, d_model], in the score
  dtype (float32; float64 for float64 models). Hooks overwrite, never add, so a
  recomputation (gradient checkpointing) changes nothing.
- dL/dx_d (backward): the gradient that reaches d's own input, not the residual
  stream. A forward pre-hook hands d a fresh view of its input and hooks that view:
  its gradient is exactly what flows back through d (the residual branch that
  bypasses d keeps the original tensor). For q/k/v and per-head destinations the
  gradient is taken after the norm (at the projection's input or output) and
  mapped back through the norm's vector-Jacobian product, recomputed with the
  norm module itself so it works for every norm the adapters know.
- As each destination's gradient arrives it is contracted at once with the
  sources that precede it and dropped: memory is O(n_src x pos x d_model) plus
  the model's own activations.

Parameters are frozen; the embedding output is the only leaf that needs a gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.utils.checkpoint

from circuitdiff.errors import UserError
from circuitdiff.graph import Graph
from circuitdiff.models.adapters import Adapter, Shape, adapter_for, get_module, model_shape


def score_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for every model dtype except float64, which keeps float64."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


@dataclass
class Batch:
    """Right-padded token ids and where the loss is taken.

    input_ids, attention_mask: [batch, pos]. loss_rows/loss_cols/targets: [n_loss_tokens]:
    the logits at (row, col) predict targets; loss_weight: [n_loss_tokens] = 1/cut_len of its row,
    so the loss of a row is the mean NLL of its answer tokens and the batch loss is their sum.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_rows: torch.Tensor
    loss_cols: torch.Tensor
    targets: torch.Tensor
    loss_weight: torch.Tensor


def make_batch(samples: list[dict], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Input = prompt + answer[:cut_len]; loss on the answer tokens only (method.md section 4)."""
    seqs, rows, cols, targets, weights = [], [], [], [], []
    for row, sample in enumerate(samples):
        prompt, answer, cut = sample["prompt_ids"], sample["answer_ids"], int(sample["cut_len"])
        seqs.append(list(prompt) + list(answer[:cut]))
        for j in range(cut):
            rows.append(row)
            cols.append(len(prompt) - 1 + j)
            targets.append(answer[j])
            weights.append(1.0 / cut)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    as_long = partial(torch.tensor, dtype=torch.long, device=device)
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        loss_rows=as_long(rows),
        loss_cols=as_long(cols),
        targets=as_long(targets),
        loss_weight=torch.tensor(weights, dtype=torch.float64, device=device),
    )


def answer_loss(model: torch.nn.Module, adapter: Adapter, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-row mean NLL of the answer tokens, [batch], in float32 (float64 for float64 models).

    hidden: [batch, pos, d_model], the final norm's output. Only the answer positions go
    through the LM head (plus the config's final logit soft-capping, as the model does).
    """
    picked = hidden[batch.loss_rows, batch.loss_cols]  # [n_loss_tokens, d_model]
    logits = get_module(model, adapter.lm_head)(picked)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logits = logits.to(score_dtype_for(logits.dtype))
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[:, None])[:, 0]
    per_row = torch.zeros(batch.input_ids.shape[0], dtype=nll.dtype, device=nll.device)
    return per_row.index_add(0, batch.loss_rows, nll * batch.loss_weight.to(nll.dtype))


class EdgeAttributor:
    """Installs the hooks for one model and granularity; `scores(batch)` runs one forward+backward."""

    def __init__(self, model: torch.nn.Module, granularity: str = "block", gradient_checkpointing: bool = False):
        self.model = model
        self.adapter = adapter_for(model)
        self.shape: Shape = model_shape(model, self.adapter)
        self.graph = Graph(self.shape.n_layers, granularity, self.shape.n_heads, self.shape.n_kv_heads)
        if granularity == "head" and not self.adapter.heads_are_additive:
            raise UserError(
                f"granularity 'head' is not defined for {self.adapter.name}: a norm after o_proj mixes the heads; "
                "use --granularity block or qkv"
            )
        self.gradient_checkpointing = gradient_checkpointing
        self.layers = get_module(model, self.adapter.layers)
        self.score_dtype = score_dtype_for(next(model.parameters()).dtype)
        self._n_prev = self.graph.n_sources_before_dst.tolist()

    # ------------------------------------------------------------------ run
    def scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [batch, n_dst, n_src] on CPU in the score dtype, loss [batch]) for one batch."""
        n_batch, n_pos = batch.input_ids.shape
        self._mask = batch.attention_mask
        self._buffers = self._allocate(n_batch, n_pos)
        first_device = next(iter(self._buffers))
        self._W = torch.zeros(
            n_batch, len(self.graph.dst_names), len(self.graph.src_names), dtype=self.score_dtype, device=first_device
        )
        self._norm_inputs: dict[int, torch.Tensor] = {}
        self._leaf = None
        backbone = get_module(self.model, self.adapter.backbone)
        with self._frozen(), self._hooks(), self._checkpointed():
            out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            loss = answer_loss(self.model, self.adapter, out.last_hidden_state, batch)
            torch.autograd.grad(loss.sum(), self._leaf)
        W, self._W, self._buffers, self._norm_inputs, self._leaf = self._W.cpu(), None, None, None, None
        return W, loss.detach().cpu()

    # ------------------------------------------------------------ buffers
    def _allocate(self, n_batch: int, n_pos: int) -> dict:
        """One [batch, n, pos, d] buffer per device; sources keep their global order within it."""
        devices = [self._device_of(self.layers[0], "attn_norm")]
        for layer in self.layers:
            devices += [self._device_of(layer, "attn_out")] * len(self.graph.attn_source_names(0))
            devices.append(self._device_of(layer, "mlp_out"))
        self._slot = []  # global source index -> (device, index within that device's buffer)
        counts: dict[torch.device, int] = {}
        for device in devices:
            self._slot.append((device, counts.get(device, 0)))
            counts[device] = counts.get(device, 0) + 1
        self._first_global = {}  # device -> global index of its first source (sources are contiguous per device)
        for index, (device, local) in enumerate(self._slot):
            if local == 0:
                self._first_global[device] = index
        d = self.shape.d_model
        return {dev: torch.zeros(n_batch, n, n_pos, d, dtype=self.score_dtype, device=dev) for dev, n in counts.items()}

    def _device_of(self, layer: torch.nn.Module, field: str) -> torch.device:
        module = get_module(layer, getattr(self.adapter, field))
        param = next(module.parameters(), None)
        return param.device if param is not None else next(self.model.parameters()).device

    def _store(self, first: int, values: torch.Tensor) -> None:
        """Write sources first..first+n-1 (values: [batch, n, pos, d]); padded positions become 0."""
        device, local = self._slot[first]
        mask = self._mask.to(device)[:, None, :, None].to(self.score_dtype)
        buf = self._buffers[device]
        buf[:, local : local + values.shape[1]] = values.to(device=device, dtype=self.score_dtype) * mask

    def _contract(self, first_dst: int, grads: torch.Tensor) -> None:
        """W[:, first_dst + i, :n_prev] = -<grads[:, i], O_u> for the destinations first_dst.. (grads [b, m, pos, d])."""
        n_prev = self._n_prev[first_dst]
        n_batch, m = grads.shape[:2]
        for device, buf in self._buffers.items():
            start = self._first_global[device]
            n_here = min(buf.shape[1], n_prev - start)
            if n_here <= 0:
                continue
            g = grads.to(device=device, dtype=self.score_dtype).reshape(n_batch, m, -1)
            src = buf[:, :n_here].reshape(n_batch, n_here, -1)
            part = -torch.bmm(g, src.transpose(1, 2))  # [batch, m, n_here]
            self._W[:, first_dst : first_dst + m, start : start + n_here] = part.to(self._W.device)

    # --------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def _frozen(self):
        flags = [p.requires_grad for p in self.model.parameters()]
        was_training = self.model.training
        self.model.requires_grad_(False)
        self.model.eval()
        try:
            with torch.enable_grad():
                yield
        finally:
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
            self.model.train(was_training)

    @contextlib.contextmanager
    def _hooks(self):
        handles = []
        adapter, graph = self.adapter, self.graph
        embed = get_module(self.model, self.adapter.backbone).get_input_embeddings()
        handles.append(embed.register_forward_hook(self._make_leaf))
        dst = 0
        for l, layer in enumerate(self.layers):
            attn = get_module(layer, adapter.attn)
            attn_norm = get_module(layer, adapter.attn_norm)
            if l == 0:
                handles.append(attn_norm.register_forward_pre_hook(self._capture_embed))
            n_attn_dst = len(graph.attn_dest_names(l))
            if graph.granularity == "block":
                handles.append(attn_norm.register_forward_pre_hook(self._tap_input(dst)))
            else:
                handles.append(attn_norm.register_forward_pre_hook(partial(self._save_norm_input, l)))
                handles += self._split_attention_taps(l, attn, attn_norm, dst)
            dst += n_attn_dst
            src_attn = graph.n_sources_before_attn(l)
            if graph.granularity == "head":
                o_proj = get_module(attn, adapter.o_proj)
                handles.append(o_proj.register_forward_pre_hook(partial(self._capture_heads, src_attn, o_proj)))
            else:
                attn_out = get_module(layer, adapter.attn_out)
                handles.append(attn_out.register_forward_hook(partial(self._capture_output, src_attn)))
            mlp_norm = get_module(layer, adapter.mlp_norm)
            handles.append(mlp_norm.register_forward_pre_hook(self._tap_input(dst)))
            dst += 1
            mlp_out = get_module(layer, adapter.mlp_out)
            handles.append(mlp_out.register_forward_hook(partial(self._capture_output, graph.n_sources_before_mlp(l))))
        final_norm = get_module(self.model, adapter.final_norm)
        handles.append(final_norm.register_forward_pre_hook(self._tap_input(dst)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _make_leaf(self, module, args, output):
        leaf = output.detach().requires_grad_(True)
        self._leaf = leaf
        return leaf

    def _capture_embed(self, module, args):
        self._store(0, args[0].detach()[:, None])

    def _capture_output(self, first_src: int, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self._store(first_src, out.detach()[:, None])

    def _capture_heads(self, first_src: int, o_proj: torch.nn.Linear, module, args):
        """Head h's share of o_proj's output: z[..., h] @ W_O[:, h]^T, [batch, n_heads, pos, d]."""
        z = args[0].detach().to(self.score_dtype)
        n_batch, n_pos, _ = z.shape
        H, dh = self.shape.n_heads, self.shape.head_dim
        w = o_proj.weight.detach().to(self.score_dtype).view(-1, H, dh)  # [d, H, dh]
        per_head = torch.einsum("bthe,dhe->bhtd", z.view(n_batch, n_pos, H, dh), w)
        self._store(first_src, per_head)

    def _save_norm_input(self, layer: int, module, args):
        self._norm_inputs[layer] = args[0].detach()

    def _tap_input(self, dst: int):
        """Pre-hook: give the module a view of its input whose gradient is contracted as destination dst."""

        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                return None
            view = x.view_as(x)
            view.register_hook(lambda g: self._contract(dst, g.detach()[:, None]))
            return (view,) + tuple(args[1:])

        return hook

    def _split_attention_taps(self, layer: int, attn, attn_norm, first_dst: int) -> list:
        """q/k/v (qkv) or per-head (head) destinations of one attention block."""
        handles = []
        graph, shape = self.graph, self.shape
        projections = [get_module(attn, getattr(self.adapter, f"{p}_proj")) for p in "qkv"]
        if graph.granularity == "qkv":
            for i, proj in enumerate(projections):
                handles.append(proj.register_forward_pre_hook(self._tap_projection_input(layer, attn_norm, first_dst + i)))
            return handles
        offsets = [0, shape.n_heads, shape.n_heads + shape.n_kv_heads]
        for proj, offset in zip(projections, offsets):
            handles.append(proj.register_forward_hook(self._tap_projection_output(layer, attn_norm, proj, first_dst + offset)))
        return handles

    def _tap_projection_input(self, layer: int, attn_norm, dst: int):
        def hook(module, args):
            y = args[0]
            if not y.requires_grad:
                return None
            view = y.view_as(y)
            view.register_hook(lambda g: self._contract(dst, self._through_norm(layer, attn_norm, g.detach()[:, None])))
            return (view,) + tuple(args[1:])

        return hook

    def _tap_projection_output(self, layer: int, attn_norm, proj: torch.nn.Linear, first_dst: int):
        """Forward hook on a q/k/v projection: per-head input gradients, then back through the norm."""
        dh = self.shape.head_dim

        def on_grad(g_out: torch.Tensor) -> None:
            n_batch, n_pos, width = g_out.shape
            n_groups = width // dh
            w = proj.weight.detach().view(n_groups, dh, -1).to(g_out.dtype)  # [groups, dh, d]
            per_group = torch.einsum("btge,ged->bgtd", g_out.detach().view(n_batch, n_pos, n_groups, dh), w)
            self._contract(first_dst, self._through_norm(layer, attn_norm, per_group))

        def hook(module, args, output):
            if not output.requires_grad:
                return None
            view = output.view_as(output)
            view.register_hook(on_grad)
            return view

        return hook

    def _through_norm(self, layer: int, norm: torch.nn.Module, grads: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian product of `norm` at its saved input for m cotangents: [b, m, pos, d] -> same."""
        x = self._norm_inputs[layer]
        m = grads.shape[1]
        with torch.enable_grad():
            xs = x.unsqueeze(1).expand(-1, m, -1, -1).clone().requires_grad_(True)
            # .forward, not __call__: the norm's own hooks (ours included) must not run again here
            (g_x,) = torch.autograd.grad(norm.forward(xs), xs, grads.to(x.dtype))
        return g_x

    # ------------------------------------------------------ checkpointing
    @contextlib.contextmanager
    def _checkpointed(self):
        """Optional activation checkpointing per decoder layer (non-reentrant, model stays in eval mode)."""
        if not self.gradient_checkpointing:
            yield
            return
        originals = []
        for layer in self.layers:
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
