"""Worker for tests/test_finetune_distributed.py, run under torchrun (gloo on CPU): the tiny conditional UNet
sharded with FSDP2 (``fully_shard`` on each block and the root), float64, trained with two SGD steps on the
global mean loss by each gradient mode of :data:`MODES` (plain autograd through the sampler, the exact adjoint
recomputing its steps or replaying graphs kept from the forward pass, the continuous adjoint with every step's
weights pulled back by the weighted pass, which under FSDP2 is a single walk). Rank 0 saves each mode's full weights (``<mode>.<name>``)
and a record of the parameters' type and of the parameters left without a gradient.
The single-process reference is :func:`train` without FSDP."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _distributed_worker import GLOBAL_BATCH, TIMESTEPS, problem  # noqa: E402
from conftest import tiny_conditional_unet  # noqa: E402

import adjointdpm as adpm  # noqa: E402
from adjointdpm.gradients import adjoint as adjoint_module  # noqa: E402

#: name → (grad mode, force the continuous adjoint's second weighted pass on every step)
MODES = {
    "backprop": ("backprop", False),
    "exact": ("exact", False),
    "exact_kept": (adpm.Exact(memory="inf"), False),
    "adjoint_weighted": ("adjoint", True),
}


def train(unet, rows: slice, share: float, mode: str = "backprop", iterations: int = 2) -> list[int]:
    """SGD on all weights for the global batch's mean loss; this process samples ``rows``, its loss weighted by
    ``share``. Returns, per iteration, how many parameters got no gradient."""
    grad, weighted_pass = MODES[mode]
    schedule, noises, conds, targets = problem()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-2)
    missing = []
    threshold = adjoint_module.SINGLE_PASS_MIN_WEIGHT
    adjoint_module.SINGLE_PASS_MIN_WEIGHT = float("inf") if weighted_pass else threshold
    try:
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            x0 = adpm.sample(unet, noises[rows], schedule=schedule, timesteps=TIMESTEPS, cond=conds[rows],
                             solver="dpmpp2m", grad=grad)
            (((x0 - targets[rows]) ** 2).mean() * share).backward()
            missing.append(sum(p.grad is None for p in unet.parameters()))
            opt.step()
    finally:
        adjoint_module.SINGLE_PASS_MIN_WEIGHT = threshold
    return missing


def sharded_unet():
    from torch.distributed.fsdp import fully_shard

    unet = tiny_conditional_unet()
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for block in blocks:
        fully_shard(block)
    fully_shard(unet)
    for module in [*blocks, unet]:  # sum the processes' gradients (each is already weighted by its share)
        module.set_gradient_divide_factor(1.0)
    return unet


if __name__ == "__main__":
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(GLOBAL_BATCH * rank // world, GLOBAL_BATCH * (rank + 1) // world)
    share = (rows.stop - rows.start) / GLOBAL_BATCH
    record, weights = {"missing": {}}, {}
    for mode in MODES:
        unet = sharded_unet()
        record["parameter_type"] = type(next(unet.parameters())).__name__
        record["missing"][mode] = train(unet, rows, share, mode)
        weights.update({f"{mode}.{n}": p.full_tensor().detach().clone() for n, p in unet.named_parameters()})
    if rank == 0:
        save_file(weights, sys.argv[1])
        Path(sys.argv[2]).write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
