"""Worker for tests/test_distributed.py, run under torchrun: fine-tune weights data-parallel and optimise a
sharded batch of noises, then save what rank 0 holds. The single-process reference uses the same functions."""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SD_BETAS, tiny_conditional_unet  # noqa: E402

import adjointdpm as adpm  # noqa: E402
from adjointdpm.distributed import DataParallel  # noqa: E402

GLOBAL_BATCH = 4
TIMESTEPS = [999, 600, 250, 10]


def problem():
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(3)
    noises = torch.randn(GLOBAL_BATCH, 2, 8, 8, dtype=torch.float64, generator=g)
    conds = torch.randn(GLOBAL_BATCH, 3, 8, dtype=torch.float64, generator=g)
    targets = torch.randn(GLOBAL_BATCH, 2, 8, 8, dtype=torch.float64, generator=g)
    return adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS)), noises, conds, targets


def fine_tune(dp: DataParallel, iterations: int = 2):
    """SGD on all weights for the global mean of a per-sample loss; returns (first gradients, final weights)."""
    schedule, noises, conds, targets = problem()
    unet = tiny_conditional_unet()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-3)
    x, c, y = dp.shard(noises), dp.shard(conds), dp.shard(targets)
    first = None
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        x0 = adpm.sample(unet, x, schedule=schedule, timesteps=TIMESTEPS, cond=c, solver="dpmpp2m", grad="exact")
        loss = ((x0 - y) ** 2).mean() * dp.loss_weight(GLOBAL_BATCH)
        loss.backward()
        dp.all_reduce_gradients(unet.parameters())
        if first is None:
            first = {n: p.grad.clone() for n, p in unet.named_parameters()}
        opt.step()
    return first, {n: p.detach().clone() for n, p in unet.named_parameters()}


def optimise_noises(dp: DataParallel, iterations: int = 3):
    """Adam on each noise for its own loss (no communication), gathered at the end."""
    schedule, noises, conds, targets = problem()
    unet = tiny_conditional_unet().requires_grad_(False)
    x = dp.shard(noises).clone().requires_grad_()
    c, y = dp.shard(conds), dp.shard(targets)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(iterations):
        opt.zero_grad()
        x0 = adpm.sample(unet, x, schedule=schedule, timesteps=TIMESTEPS, cond=c, solver="ddim", grad="adjoint")
        ((x0 - y) ** 2).sum().backward()
        opt.step()
    return dp.gather(x.detach())


if __name__ == "__main__":
    torch.set_num_threads(1)
    dp = DataParallel(cpu=True)
    assert dp.world_size == 2, dp.world_size
    grads, weights = fine_tune(dp)
    noises = optimise_noises(dp)
    if dp.is_main:
        tensors = {f"grad.{k}": v for k, v in grads.items()} | {f"weight.{k}": v for k, v in weights.items()}
        save_file(tensors | {"noises": noises}, sys.argv[1])
    dp.close()
    # leave without running C++ static destructors: under load, gloo's threads can still be joinable then and
    # abort the process ("terminate called without an active exception") after the results are written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
