"""The objective L whose gradient EAP reads, per batch row, in float32 (float64 for float64 models).

- ``nll`` (the paper's): the mean over the first cut_len answer tokens of -log p(answer token | prefix),
  from the model's logits (after its final soft-capping, if the config has one). It saturates: as
  the model grows sure of its answer, p -> 1 and every gradient shrinks with 1 - p.
- ``logit``: minus the mean over the same tokens of the centred logit z_answer - mean_v z_v, from
  the LM head's raw output (no soft-capping). It is linear in the final norm's output, so it does
  not saturate: doubling the final norm's weight doubles L and every W exactly. The minus sign keeps
  the meaning of W: W > 0 says that removing the edge lowers the answer's logit (the edge helps).

Only the answer positions go through the LM head, so the head's cost does not grow with the prompt.
"""

from __future__ import annotations

import torch

from circuitdiff.engine.batch import Batch
from circuitdiff.choices import OBJECTIVES, check_choice
from circuitdiff.models.adapters import Adapter, get_module



def score_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for every model dtype except float64, which keeps float64."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def check_objective(name: str) -> str:
    return check_choice("objective", name, OBJECTIVES)


def answer_logits(model: torch.nn.Module, adapter: Adapter, hidden: torch.Tensor, batch: Batch,
                  softcap: bool = True) -> torch.Tensor:
    """Logits at the answer positions [n_loss_tokens, vocab] in the score dtype; hidden: the final norm's output."""
    picked = hidden[batch.loss_rows, batch.loss_cols]  # [n_loss_tokens, d_model]
    logits = get_module(model, adapter.lm_head)(picked)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap and softcap:
        logits = torch.tanh(logits / cap) * cap
    return logits.to(score_dtype_for(logits.dtype))


def per_row(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[n_loss_tokens] -> [batch]: each row's weighted mean over its answer tokens."""
    out = torch.zeros(batch.n_rows, dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.loss_rows, values * batch.loss_weight.to(values.dtype))


def answer_loss(model: torch.nn.Module, adapter: Adapter, hidden: torch.Tensor, batch: Batch,
                objective: str = "nll") -> torch.Tensor:
    """The objective per row, [batch]: the mean NLL of the answer tokens, or minus their mean centred logit."""
    if objective == "logit":
        logits = answer_logits(model, adapter, hidden, batch, softcap=False)
        centred = logits.gather(-1, batch.targets[:, None])[:, 0] - logits.mean(dim=-1)
        return per_row(-centred, batch)
    check_objective(objective)
    logits = answer_logits(model, adapter, hidden, batch)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[:, None])[:, 0]
    return per_row(nll, batch)
