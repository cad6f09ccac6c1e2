"""How a fixed global batch is split across however many workers there are. Pure.

Every rank takes a contiguous slice of the global batch's sample indices (sizes differ by at
most one) and walks it in micro-batches no larger than ``max_micro``, accumulating gradients.
Each micro-batch's summed loss is scaled by ``world / global_batch``; DDP's all-reduce then
averages over ranks, so the gradient is exactly the mean over the global batch whatever the
world size. A resize changes the split, never the optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Share:
    start: int  # first sample index (within the global batch) of this rank
    size: int
    micro_batches: list[tuple[int, int]]  # (offset within the global batch, size)


def share(global_batch: int, world: int, rank: int, max_micro: int) -> Share:
    if global_batch < world:
        raise ValueError(f"global batch {global_batch} is smaller than the {world} workers")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    if max_micro < 1:
        raise ValueError("max_micro must be >= 1")
    base, extra = divmod(global_batch, world)
    size = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    micro = []
    offset = start
    while offset < start + size:
        n = min(max_micro, start + size - offset)
        micro.append((offset, n))
        offset += n
    return Share(start, size, micro)


def loss_scale(global_batch: int, world: int) -> float:
    """Multiply a micro-batch's *summed* loss by this before backward()."""
    return world / global_batch
