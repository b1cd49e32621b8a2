"""Noise optimisation for a one- or few-step (turbo-style) model: optimise x_T and every injected noise.

ReNO / DNO-style: a turbo model samples in 1–4 Euler-ancestral steps on the "trailing" grid (SD-Turbo,
SDXL-Turbo); the sample depends on x_T and, with more than one step, on the noise each step injects.
Both are leaves here and receive the exact gradient of the sampler (grad="exact": memory of one step's
activations plus N latents). One step from t = 999 lands on σ = 0 and injects nothing, so there x_T is
the only noise to optimise.

    python docs/examples/few_step_noise_optimisation.py                 # tiny random UNet, runs anywhere
    python docs/examples/few_step_noise_optimisation.py --steps 1

With a real model, replace ``tiny_unet()`` by ``UNet2DConditionModel.from_pretrained(<turbo>/unet)``, the
scheduler by ``EulerAncestralDiscreteScheduler.from_pretrained(<turbo>/scheduler)`` (it ships with
timestep_spacing="trailing"), ``cond`` by the prompt's text embeddings, and ``reward`` by a differentiable
score of ``vae.decode(x0 / vae.config.scaling_factor).sample``. Re-sample the optimised noises with the
same call and ``grad=None``.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

import adjointdpm as adpm


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    ).eval().requires_grad_(False)


def reward(x0: torch.Tensor) -> torch.Tensor:
    """A stand-in differentiable reward: the first latent channel's mean should be +0.5."""
    return -(x0[:, 0].mean(dim=(1, 2)) - 0.5).square().sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (1–4 for turbo models)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    unet = tiny_unet()
    scheduler = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                timestep_spacing="trailing")
    scheduler.set_timesteps(args.steps)
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 3, 16, generator=gen)                          # the prompt's embeddings
    x_T = torch.randn(1, 4, 8, 8, generator=gen).requires_grad_()        # the pipeline's latents=
    noise = adpm.noise_tensor(seed=2, num_steps=args.steps, like=x_T)    # what each step injects
    noise.requires_grad_()
    optimiser = torch.optim.Adam([x_T, noise], lr=args.lr)

    for it in range(args.iterations):
        x0 = adpm.sample(unet, x_T, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond,
                         solver="euler_ancestral", noise=noise, grad="exact")
        loss = -reward(x0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if it % 5 == 0 or it == args.iterations - 1:
            print(f"iteration {it:3d}  loss {loss.item():.4f}  |∂L/∂noise| {noise.grad.norm().item():.3e}")

    with torch.no_grad():  # the optimised sample, re-sampled without a graph
        x0 = adpm.sample(unet, x_T, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond,
                         solver="euler_ancestral", noise=noise, grad=None)
    print(f"final reward {reward(x0).item():.4f}")


if __name__ == "__main__":
    main()
