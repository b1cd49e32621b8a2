"""Full-weight fine-tuning with the weights sharded over the processes (torch's FSDP2, ``fully_shard``).

:func:`shard_network` calls ``fully_shard`` on every block of the denoising network (each module of its
``ModuleList`` children — a UNet's ``down_blocks``/``up_blocks``, a transformer's ``transformer_blocks`` —
and a UNet's ``mid_block``) and then on the network itself: each process keeps 1/P of every weight, a block's
forward all-gathers its weights and frees them after, and after each reverse pass FSDP2 reduce-scatters the
block's gradient into the sharded ``p.grad``. The engine's gradient modes and the fine-tuning methods reach
the sharded weights (:mod:`adjointdpm.gradients.sharded`), one reduce-scatter per reverse pass. FSDP2 averages
the processes' gradients (its default divide factor P): the gradient of the global batch's mean loss when every
process holds the same number of samples.

:func:`full_tensor` and :func:`full_weights` gather sharded tensors back (collectives: every process calls
them, in the same order); :func:`like` shards a full tensor as a sharded one is; :func:`saving_full_weights`
makes ``state_dict()`` (and so ``save_pretrained``) give the gathered weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .gradients.sharded import is_sharded


def shard_network(network: nn.Module) -> list[nn.Module]:
    """Shard ``network`` in place with FSDP2 (its blocks, then itself); returns the sharded blocks. The
    parameters are new (DTensor) objects afterwards: read them again from the network."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for child in network.children() if isinstance(child, nn.ModuleList) for m in child]
    mid = getattr(network, "mid_block", None)
    if isinstance(mid, nn.Module):
        blocks.append(mid)
    for block in blocks:
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(network)
    return blocks


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective), a plain tensor as it is."""
    return t.full_tensor() if is_sharded([t]) else t


def like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` (the whole tensor, the same on every process) laid out as ``reference``: this process's shard
    when ``reference`` is sharded, else ``full`` on its device and dtype."""
    full = full.to(device=reference.device, dtype=reference.dtype)
    if not is_sharded([reference]):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, reference.device_mesh, reference.placements)


def full_weights(network: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """{name: the gathered weight on the CPU} of the network's sharded parameters (every process must call;
    only where ``keep`` are they held, one at a time elsewhere)."""
    reshard(network)
    out = {}
    for name, p in network.named_parameters():
        if is_sharded([p]):
            t = p.detach().full_tensor()
            if keep:
                out[name] = t.cpu()
    return out


def reshard(network: nn.Module) -> None:
    """Put the sharded parameters back in place: FSDP2 leaves the root's gathered weights registered after a
    forward (it does not reshard the root, whose backward comes first)."""
    from torch.distributed.fsdp import FSDPModule

    for module in network.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def saving_full_weights(network: nn.Module, full: dict[str, torch.Tensor]):
    """While inside, ``network.state_dict()`` holds ``full``'s tensors in place of the sharded ones."""
    def replace(module, state_dict, prefix, local_metadata):
        for name, t in full.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = t

    handle = network.register_state_dict_post_hook(replace)
    try:
        yield
    finally:
        handle.remove()
