"""A batch of samples for the engine: right-padded token ids and where the objective reads them.

A sample is ``{"prompt_ids": [...], "answer_ids": [...], "cut_len": K}``: the model reads
prompt + answer[:K], and the objective is taken at the K answer positions only (the prompt
carries no loss, but it does carry gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch


@dataclass
class Batch:
    """Right-padded token ids and where the objective is taken.

    input_ids, attention_mask: [batch, pos]. loss_rows/loss_cols/targets: [n_loss_tokens]:
    the logits at (row, col) predict targets; loss_weight: [n_loss_tokens] = 1/cut_len of its row,
    so a row's objective is the mean over its answer tokens and the batch objective their sum.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_rows: torch.Tensor
    loss_cols: torch.Tensor
    targets: torch.Tensor
    loss_weight: torch.Tensor

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])


def make_batch(samples: list[dict], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Input = prompt + answer[:cut_len]; the objective on the answer tokens only."""
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


def pad_id_of(model: torch.nn.Module) -> int:
    """The id used for right padding (padded positions are masked, so any id works): the config's, else 0."""
    return getattr(model.config, "pad_token_id", None) or 0


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids go: the device of the input embedding."""
    return model.get_input_embeddings().weight.device
