"""Data-parallel training of one run by several processes (torch.distributed): the trainer's ``replica``.

Every process draws the same global micro-batch (its images, prompts, timesteps and noise depend only on
(seed, step, micro-batch)) and takes its own contiguous rows of it (``shard``): process r of N the rows
r*B/N .. (r+1)*B/N - 1 of a batch of B. After the backward pass of every micro-batch the vectors'
gradients are averaged over the processes (``average``: an all-reduce), which is the gradient of the
global batch's mean loss, since the shards are equal; the per-sample g of Eq. 4 are gathered in rank
order (``gather``), so every process's timestep sampler sees exactly what one process with the global
batch would see, and every process takes the same optimiser step: the vectors stay identical on all of
them, and equal to one process's with batch B, to float tolerance (the denoiser runs on smaller batches).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Replica", "TorchReplica"]


@runtime_checkable
class Replica(Protocol):
    rank: int
    world_size: int

    def shard(self, draw):
        """This process's rows of a micro-batch drawn whole (``batch.Draw``)."""
        ...

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Each tensor replaced, in place, by its mean over the processes."""
        ...

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's ``values`` [n] concatenated in rank order."""
        ...


class TorchReplica:
    """``Replica`` over an initialised ``torch.distributed`` process group (gloo on CPUs, NCCL on GPUs)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("data-parallel training needs torch.distributed initialised (run under torchrun)")
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def rows(self, n: int) -> slice:
        per = n // self.world_size  # the trainer refuses a batch the processes cannot share evenly
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, draw):
        s = self.rows(len(draw.idx))
        return replace(draw, idx=draw.idx[s], prompts=draw.prompts[s], t=draw.t[s], x0=draw.x0[s], noise=draw.noise[s],
                       mask=None if draw.mask is None else draw.mask[s])

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
            t.div_(self.world_size)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        self.dist.all_gather(parts, values.contiguous(), group=self.group)
        return torch.cat(parts)
