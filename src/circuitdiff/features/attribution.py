"""Step 5: which latents carry the tuned model's gains: attribution on questions only the tuned model solves.

For each dataset of the run, the questions the tuned model answers correctly and the base model does
not are sorted by idx; every second one (positions 0, 2, 4, ...) is used here, the rest stay for the
interventions (which never see an attribution question). On each, the tuned model reads its own answer
while the other models run in lockstep on the same tokens; the code f of the crosscoder enters the tuned
model's residual as h + (f - f.detach()) @ W_dec[:, tuned] / s_tuned, which leaves the forward pass
unchanged and lets the answer's loss reach f (settings.FEATURE_ATTRIBUTION). Top-K per dataset (positive
attribution only); the compact set is the latents in the top-K of every dataset.
"""

from __future__ import annotations

import numpy as np
import torch

from circuitdiff.features.crosscoder import Crosscoder
from circuitdiff.features.lockstep import backbone_of, lockstep
from circuitdiff.store import artifacts


def question_split(run, dataset: str, target: str = "tuned", base: str = "base") -> tuple[list[dict], set[int]]:
    """(attribution rows: the target's generations of every second question only it solves, their idx)."""
    base_rows = {r["idx"]: r for r in artifacts.read_generations(run, base, dataset)}
    only = [r for r in sorted(artifacts.read_generations(run, target, dataset), key=lambda r: r["idx"])
            if r["correct"] and r["idx"] in base_rows and not base_rows[r["idx"]]["correct"] and r["answer_ids"]]
    chosen = only[::2]
    return chosen, {r["idx"] for r in chosen}


class _AttributionEdit:
    """h -> h + (f - f.detach()) @ W_dec[:, target] / s_target; keeps f (a leaf) for its gradient."""

    def __init__(self, cc: Crosscoder, target: int):
        self.cc, self.target = cc, target
        self.W = (cc.W_dec[:, target] / cc.input_scale[target]).detach()  # [F, d], raw units
        self.f: torch.Tensor | None = None

    def __call__(self, h: torch.Tensor, partner_h: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            f = self.cc.code_of(h, partner_h, self.target)
        self.f = f.requires_grad_(True)
        delta = (self.f - self.f.detach()) @ self.W
        return h + delta.view(h.shape).to(h.dtype)


def attribute_latents(target_model, partners: list, cc: Crosscoder, target: int, layer: int, samples: list[dict],
                      batch_size: int = 4) -> np.ndarray:
    """[F] mean over samples of A_j = - sum over positions of f_j dL/df_j (float64); L = each sample's mean NLL.

    samples: [{prompt_ids, answer_ids, cut_len}] of the target model; partners in the crosscoder's order
    without the target."""
    from circuitdiff.engine import answer_loss, input_device, make_batch, pad_id_of
    from circuitdiff.models.adapters import adapter_for

    device, pad_id, adapter = input_device(target_model), pad_id_of(target_model), adapter_for(target_model)
    edit = _AttributionEdit(cc, target)
    total = torch.zeros(cc.n_latents, dtype=torch.float64)
    was_training = target_model.training
    target_model.eval()
    try:
        with lockstep(target_model, partners, layer, edit):
            for start in range(0, len(samples), batch_size):
                batch = make_batch(samples[start : start + batch_size], pad_id, device)
                hidden = backbone_of(target_model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                   use_cache=False).last_hidden_state
                loss = answer_loss(target_model, adapter, hidden, batch, "nll")
                (grad,) = torch.autograd.grad(loss.sum(), edit.f)
                B, T = batch.input_ids.shape
                per_pos = -(edit.f.detach() * grad).view(B, T, -1) * batch.attention_mask[..., None]
                total += per_pos.sum((0, 1)).double().cpu()
    finally:
        target_model.train(was_training)
    return (total / max(len(samples), 1)).numpy()


def top_latents(attribution: np.ndarray, k: int) -> list[int]:
    """The k latents with the largest positive attribution, largest first (fewer when fewer are positive)."""
    order = np.argsort(-attribution, kind="stable")
    return [int(j) for j in order[:k] if attribution[j] > 0]


def compact_set(tops: dict[str, list[int]]) -> list[int]:
    """The latents in every dataset's top list, in the order of the first dataset's ranks."""
    if not tops:
        return []
    first, *rest = tops.values()
    return [j for j in first if all(j in other for other in rest)]


def rows(attributions: dict[str, np.ndarray], tops: dict[str, list[int]], n_questions: dict[str, int],
         classes: list[str], relative_norm: np.ndarray, compact: list[int]) -> list[dict]:
    """attribution.csv: one row per (dataset, top latent)."""
    out = []
    for dataset, top in tops.items():
        for rank, j in enumerate(top, 1):
            out.append({"dataset": dataset, "rank": rank, "latent": j, "attribution": float(attributions[dataset][j]),
                        "n_questions": n_questions[dataset], "class": classes[j],
                        "relative_norm": float(relative_norm[j]), "in_compact_set": j in compact})
    return out
