"""Shard planning: the one-process batches, grouped into shards of about equal cost (no torch, no Ray).

A shard is a list of whole batches exactly as one process would form them (same samples, same
order, same padding), so a worker computes each batch bit for bit as one process would: the
merged output equals the one-process output. Every batch lands in exactly one shard.

Balance: a batch's cost is its padded size (rows x the longest sequence in it, prompt plus what
is read or generated); batches go, largest first, to the shard with the least cost so far (LPT:
the largest shard is at most the mean plus one batch). Shards are numbered by decreasing cost,
which is the order the dynamic queue hands them out (the longest work starts first, the short
shards fill the gaps at the end).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

SHARDS_PER_WORKER = 4  # more shards than workers: the dynamic queue evens out what the costs do not predict


@dataclass(frozen=True)
class Shard:
    number: int
    batches: tuple[tuple[int, ...], ...]  # batch = item indices, in the one-process order
    cost: float

    @property
    def items(self) -> list[int]:
        return [i for batch in self.batches for i in batch]


def batches_by_length(lengths: Sequence[int], batch_size: int, tie: Sequence[int] | None = None) -> list[list[int]]:
    """The one-process batches: items sorted by decreasing length (ties by `tie`, default the index), cut into
    batches of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1")
    tie = list(range(len(lengths))) if tie is None else list(tie)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_cost(batch: Sequence[int], lengths: Sequence[int], extra: int = 0) -> float:
    """rows x (longest length + extra): what a right- or left-padded batch computes."""
    return float(len(batch) * (max(lengths[i] for i in batch) + extra)) if batch else 0.0


def n_shards_for(n_batches: int, workers: int, per_worker: int = SHARDS_PER_WORKER) -> int:
    return max(1, min(n_batches, workers * per_worker))


def plan_shards(batches: Sequence[Sequence[int]], costs: Sequence[float], n_shards: int) -> list[Shard]:
    """Group `batches` into at most `n_shards` shards of about equal total cost (LPT), each batch once.

    Inside a shard the batches keep their one-process order; shards are numbered by decreasing cost
    (ties: by their first batch's position)."""
    if len(batches) != len(costs):
        raise ValueError("one cost per batch")
    n_shards = max(1, min(int(n_shards), len(batches)))
    if not batches:
        return []
    heap = [(0.0, s) for s in range(n_shards)]  # (cost so far, bin)
    bins: list[list[int]] = [[] for _ in range(n_shards)]
    for b in sorted(range(len(batches)), key=lambda b: (-costs[b], b)):
        cost, s = heapq.heappop(heap)
        bins[s].append(b)
        heapq.heappush(heap, (cost + costs[b], s))
    groups = [sorted(members) for members in bins if members]
    groups.sort(key=lambda members: (-sum(costs[b] for b in members), members[0]))
    return [Shard(number, tuple(tuple(batches[b]) for b in members), float(sum(costs[b] for b in members)))
            for number, members in enumerate(groups)]


def in_batch_order(shards: Sequence[Shard], batches: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(shard position, batch position within that shard) for every batch in the one-process order: how to
    lay the shards' outputs back in one process's order."""
    where = {tuple(batch): (s, j) for s, shard in enumerate(shards) for j, batch in enumerate(shard.batches)}
    return [where[tuple(batch)] for batch in batches]
