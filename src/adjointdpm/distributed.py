"""Scale-out across processes with accelerate: data parallelism for weights, sharding for noises.

Weights (fine-tuning, e.g. stylization). The global batch of B samples (noises, prompts) is split into
contiguous shards, one per process. Process p back-propagates (B_p / B) · (its shard's mean loss) with any
gradient mode; an all-reduce *sum* of the weight gradients then gives every process the gradient of the
global mean loss, so identical optimiser steps keep the weights identical everywhere. DDP is not used on
purpose: its hooks expect each parameter's gradient once per backward pass, while the engine accumulates
into ``p.grad`` once per sampling step. The all-reduce goes through ``accelerate`` (one flat bucket).

Noises (guided sampling, auditing). Each initial noise is its own optimisation variable and the networks
act on samples independently, so the noises are sharded and optimised without any communication; the
results are gathered at the end.

Launch on several GPUs or processes with ``accelerate launch --num_processes P your_script.py`` (or
``torchrun --nproc_per_node P``); a single process works unchanged (every call is then a no-op).
"""
from __future__ import annotations

from typing import Iterable

import torch


class DataParallel:
    """Rank bookkeeping, sharding and gradient all-reduce over an ``accelerate.Accelerator``."""

    def __init__(self, accelerator=None, cpu: bool | None = None):
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=not torch.cuda.is_available() if cpu is None else cpu)
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def shard_bounds(self, global_size: int) -> tuple[int, int]:
        """[start, stop) of this process's contiguous shard of a global batch."""
        if global_size < self.world_size:
            raise ValueError(
                f"a global batch of {global_size} cannot be split over {self.world_size} processes; "
                "use at least one sample per process"
            )
        return global_size * self.rank // self.world_size, global_size * (self.rank + 1) // self.world_size

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (dimension 0)."""
        start, stop = self.shard_bounds(batch.shape[0])
        return batch[start:stop]

    def loss_weight(self, global_size: int) -> float:
        """B_p / B: scale this shard's mean loss by it so the summed gradients are the global mean's."""
        start, stop = self.shard_bounds(global_size)
        return (stop - start) / global_size

    def all_reduce_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Sum ``p.grad`` over processes, in one flat bucket (missing gradients count as zero)."""
        params = [p for p in params if p.requires_grad]
        if self.world_size == 1 or not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        flat = self.accelerator.reduce(flat, reduction="sum")
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's shard (dimension 0) in rank order; equal-size shards only."""
        if self.world_size == 1:
            return shard
        return self.accelerator.gather(shard.contiguous())
