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

Sharded weights (FSDP2, :mod:`adjointdpm.fsdp`): the weights' gradients are reduce-scattered by FSDP2 itself
during each reverse pass, so :meth:`DataParallel.all_reduce_gradients` leaves sharded (DTensor) parameters
alone. ``finetune --fsdp`` shards the network itself under torchrun or ``accelerate launch --multi_gpu``; an
``accelerate launch`` with an FSDP configuration (``distributed_type: FSDP``, :attr:`DataParallel.shards_weights`)
would expect accelerate's own wrapping and is refused by finetune with one line.

Launch on several GPUs or processes with ``accelerate launch --num_processes P your_script.py`` (or
``torchrun --nproc_per_node P``); a single process works unchanged (every call is then a no-op).
The ``adjointdpm`` commands pick their mode with :func:`from_environment`: :class:`SingleProcess` (the
identity everywhere, accelerate not even imported) unless launched with more than one process.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from .gradients.sharded import is_sharded


def from_environment(device: torch.device | str = "cpu"):
    """:class:`DataParallel` when launched with several processes (``WORLD_SIZE`` > 1, as set by torchrun and
    ``accelerate launch``), else :class:`SingleProcess`. On CUDA each process takes its local GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess()
    return DataParallel(cpu=torch.device(device).type != "cuda")


class SingleProcess:
    """The :class:`DataParallel` interface for one process: every call is the identity (same tensor objects)."""

    rank, world_size, is_main, shards_weights = 0, 1, True, False

    def shard_bounds(self, global_size: int) -> tuple[int, int]:
        return 0, global_size

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def loss_weight(self, global_size: int) -> float:
        return 1.0

    def all_reduce_gradients(self, params: Iterable[torch.Tensor]) -> None:
        pass

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        return shard

    def gather_shards(self, shard: torch.Tensor) -> torch.Tensor:
        return shard

    def close(self) -> None:
        pass

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def mean(self, values: torch.Tensor) -> float:
        return float(values.float().mean())

    def position(self, local_size: int) -> tuple[int, int]:
        return 0, local_size

    def any(self, flag) -> bool:
        return bool(flag)

    def all(self, flag) -> bool:
        return bool(flag)


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

    @property
    def shards_weights(self) -> bool:
        """True when launched with an FSDP configuration (``accelerate launch --config_file`` with
        ``distributed_type: FSDP``): the user asked for sharded weights, which this class does not do (it
        replicates them)."""
        return str(getattr(self.accelerator, "distributed_type", "")).endswith("FSDP")

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
        """Sum ``p.grad`` over processes, in one flat bucket (missing gradients count as zero). Sharded
        (FSDP2, DTensor) parameters are skipped: their gradients were reduce-scattered in the reverse pass."""
        params = [p for p in params if p.requires_grad and not is_sharded([p])]
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

    # ---------------------------------------------------------------- uneven shards and small reductions
    def _sizes(self, local_size: int) -> list[int]:
        sizes = self.accelerator.gather(torch.tensor([int(local_size)], device=self.device))
        return [int(v) for v in sizes.cpu()]

    def gather_shards(self, shard: torch.Tensor) -> torch.Tensor:
        """Every process's rows (dimension 0) in rank order, on every process; shards may differ in size
        (padded to the largest for the gather, the padding dropped)."""
        if self.world_size == 1:
            return shard
        sizes = self._sizes(shard.shape[0])
        rows = max(sizes)
        x = shard.detach().to(self.device)
        x = x.to(torch.uint8) if shard.dtype == torch.bool else x
        if x.shape[0] < rows:
            x = torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])
        full = self.accelerator.gather(x.contiguous())
        full = torch.cat([full[r * rows: r * rows + n] for r, n in enumerate(sizes)])
        return full.to(device=shard.device, dtype=shard.dtype)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (same dtype and device as ``values``)."""
        if self.world_size == 1:
            return values
        return self.accelerator.reduce(values.detach().to(self.device).clone(), reduction="sum").to(values.device)

    def mean(self, values: torch.Tensor) -> float:
        """Mean of ``values`` pooled over every process (each process may hold any number, even none)."""
        both = self.sum(torch.stack([values.double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                          device=values.device)]))
        return float(both[0] / both[1])

    def position(self, local_size: int) -> tuple[int, int]:
        """(offset, total): where this process's ``local_size`` rows start in the concatenation over
        processes (rank order), and the total number of rows."""
        sizes = self._sizes(local_size)
        return sum(sizes[: self.rank]), sum(sizes)

    def any(self, flag) -> bool:
        return bool(self.sum(torch.tensor([1 if flag else 0], device=self.device)).item() > 0)

    def all(self, flag) -> bool:
        return not self.any(not flag)

    def close(self) -> None:
        """Wait for every process, then tear the process group down. Without this a process that finishes
        first can exit while gloo's threads still serve the others, which aborts it ("terminate called
        without an active exception")."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        self.accelerator.wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()
