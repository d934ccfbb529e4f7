"""Step 6: ablate the compact set in the tuned model, amplify it in the base, against matched random latent sets.

Edit (settings.INTERVENTION): at layer L of the target model, h <- h + sum_{j in S} (c - 1) f_j W_dec[j, source] /
s_target, with f the crosscoder's code of every model's residual on the target's tokens (the other models
run in lockstep), so the crosscoder's error term stays in h. Conditions, on the same questions (paired):
- tuned, c = 0, source tuned: the compact set removed from the tuned model;
- base, c in factors (2, 4), source tuned: the tuned model's decoder directions of the set added to the base
  at (c - 1) times their strength (for a shared latent this amplifies the base's own direction);
- for each, `n_random` random sets matched in size and activation magnitude (settings.RANDOM_CONTROL).
Measures per question: the mean NLL of the target model's own unmodified greedy answer (teacher forced,
edit active) and the correctness of a fresh greedy answer generated with the edit active. Effects vs the
unmodified model with 95% paired-bootstrap CIs over questions (circuitdiff.intervene.paired_effects) and
exact McNemar tests (circuitdiff.stats.accuracy_difference).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from circuitdiff.features.crosscoder import Crosscoder
from circuitdiff.features.lockstep import backbone_of, lockstep


def matched_random(targeted: list[int], magnitude: np.ndarray, alive: np.ndarray, n_draws: int, pool: int = 10,
                   seed: int = 0) -> list[list[int]]:
    """n_draws sets: each targeted latent replaced by one of the `pool` alive, non-targeted latents closest in log
    magnitude (uniform, without replacement within a draw)."""
    chosen = set(targeted)
    candidates = np.array([j for j in np.flatnonzero(alive & (magnitude > 0)) if j not in chosen])
    if len(candidates) < len(targeted):
        return []
    log_m = np.log(magnitude[candidates])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_draws):
        used: set[int] = set()
        draw = []
        for j in targeted:
            free = np.array([c not in used for c in candidates])
            distance = np.where(free, np.abs(log_m - np.log(max(magnitude[j], 1e-30))), np.inf)
            nearest = np.argsort(distance, kind="stable")[: min(pool, int(free.sum()))]
            pick = int(candidates[rng.choice(nearest)])
            used.add(pick)
            draw.append(pick)
        draws.append(draw)
    return draws


class LatentEdit:
    """h -> h + (c - 1) * f_S @ W_dec[S, source] / s_target (nothing at all when S is empty or c = 1)."""

    def __init__(self, cc: Crosscoder, target: int, source: int, latents: list[int], factor: float):
        self.cc, self.target, self.latents, self.factor = cc, target, list(latents), float(factor)
        self.W = (cc.W_dec[self.latents, source] / cc.input_scale[target]).detach()  # [S, d], raw units

    @property
    def inert(self) -> bool:
        return not self.latents or self.factor == 1.0

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, partner_h: list[torch.Tensor]) -> torch.Tensor:
        if self.inert:
            return h
        f = self.cc.code_of(h, partner_h, self.target)[:, self.latents]
        return h + ((self.factor - 1.0) * f @ self.W).view(h.shape).to(h.dtype)


class _Editor:
    """The shape engine.ablation's loss and generation helpers expect of an editor: edits() is the lockstep."""

    def __init__(self, model, partners: list, layer: int, edit: LatentEdit | None):
        from circuitdiff.models.adapters import adapter_for

        self.model, self.partners, self.layer, self.edit = model, partners, layer, edit
        self.nodes = SimpleNamespace(backbone=backbone_of(model))
        self.adapter = adapter_for(model)

    def edits(self, _unused):
        if self.edit is None or self.edit.inert:
            return contextlib.nullcontext()
        return lockstep(self.model, self.partners, self.layer, self.edit)


@dataclass
class Outcome:
    loss: np.ndarray  # [n] mean NLL of the unmodified answer
    correct: np.ndarray  # [n] 0/1
    answers_changed: int = 0


def measure(model, partners: list, layer: int, edit: LatentEdit | None, loss_samples: list[dict], questions: list[dict],
            *, eos_ids, pad_id, decode, truncated_rule: str, max_new_tokens: int, gen_batch_size: int = 16,
            loss_batch_size: int = 8) -> tuple[Outcome, list]:
    """(Outcome, answers) of the target model with `edit` active (None: unmodified)."""
    from circuitdiff.engine import generate_with_edits, losses_with_edits
    from circuitdiff.grade import grade

    editor = _Editor(model, partners, layer, edit)
    was_training = model.training
    model.eval()
    try:
        loss = losses_with_edits(model, editor, loss_samples, None, loss_batch_size, "nll")
        gens = generate_with_edits(model, editor, [q["prompt_ids"] for q in questions], None, eos_ids=eos_ids,
                                   pad_id=pad_id, max_new_tokens=max_new_tokens, batch_size=gen_batch_size)
    finally:
        model.train(was_training)
    correct = np.array([float(grade(decode(g.answer_ids), q["gold"], q.get("kind", "numeric"), finished=g.stop == "eos",
                                    truncated_rule=truncated_rule).correct) for g, q in zip(gens, questions)])
    return Outcome(loss, correct), [g.answer_ids for g in gens]


def effect_rows(model_label: str, factor: float, source: str, n_latents: int, none: Outcome, targeted: Outcome,
                random: list[Outcome], magnitude_ratio: list[float], n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """interventions.csv rows of one (target model, factor): none, targeted, random (mean), each random draw and
    targeted - random, for accuracy and loss."""
    from circuitdiff.intervene import paired_effects
    from circuitdiff.stats import accuracy_difference

    out = []
    base = {"model": model_label, "factor": factor, "decoder": source, "n_latents": n_latents}
    for measure_name, attr in (("accuracy", "correct"), ("loss", "loss")):
        values = {"none": getattr(none, attr), "targeted": getattr(targeted, attr)}
        if random:
            values["random"] = np.array([getattr(r, attr) for r in random])
        e = paired_effects(values, n_boot, seed)
        n = e["n"]

        def row(condition, value, effect=None, p=None, **extra):
            ci = effect["ci"] if effect else [float("nan")] * 2
            out.append({**base, "measure": measure_name, "condition": condition, "n_questions": n, "value": value,
                        "effect": effect["mean"] if effect else 0.0, "ci_low": ci[0], "ci_high": ci[1],
                        "p_mcnemar": p if p is not None else float("nan"), **extra})

        mcnemar = (lambda other: accuracy_difference(none.correct, other.correct, n_boot, seed).p_mcnemar) \
            if measure_name == "accuracy" else (lambda other: None)
        row("none", e["mean_none"])
        row("targeted", e["mean_targeted"], e["targeted_minus_none"], mcnemar(targeted))
        if random:
            draws = e["random_draw_effects"]
            row("random", e["mean_random"], e["random_minus_none"], None, draws_min=min(draws), draws_max=max(draws),
                magnitude_ratio=float(np.mean(magnitude_ratio)))
            for r, (outcome, d) in enumerate(zip(random, draws)):
                row(f"random-{r}", float(getattr(outcome, attr).mean()), {"mean": d, "ci": [float("nan")] * 2},
                    mcnemar(outcome), magnitude_ratio=magnitude_ratio[r])
            row("targeted-minus-random", e["mean_targeted"] - e["mean_random"], e["targeted_minus_random"])
    return out
