"""Peak memory of differentiating a stochastic sampler, in fresh processes: is ``exact`` flat in N?

For N = 10 and N = 50 DDPM steps on a tiny random UNet (float32, latents 4×64×64), each configuration
runs in its own process and reports its peak resident set size (``ru_maxrss``) after one
``loss.backward()``: grad="exact" with a seeded noise (regenerated on the way back, not stored), the same with one seed per
sample (a batch of 2, each sample its own stream: what the commands use),
grad="exact" with an explicit noise tensor that requires grad (the N×latent tensor and its gradient are
inputs, so they count), and grad="backprop" (the autograd graph grows with N).

    PYTHONPATH=src python scripts/stochastic_memory.py

Measured (2 shared CPU cores, about 12 minutes, most of it backprop at N = 50), growth of the peak RSS
during sample + backward, N = 10 → 50: exact/seed 59 → 65 MiB, exact/per-sample (batch 2) 97 → 104 MiB,
exact/tensor 59 → 68 MiB, backprop 268 → 1203 MiB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

CONFIGS = [("exact", "seed"), ("exact", "per-sample"), ("exact", "tensor"), ("backprop", "seed")]
STEPS = (10, 50)


def child(steps: int, grad: str, noise_kind: str) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    import adjointdpm as adpm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    scheduler.set_timesteps(steps)
    batch = 2 if noise_kind == "per-sample" else 1
    x_T = torch.randn(batch, 4, 64, 64, requires_grad=True)
    cond = torch.randn(batch, 3, 16, requires_grad=True)
    noise = {"seed": 0, "per-sample": [0, 1]}.get(noise_kind)
    if noise is None:
        noise = adpm.noise_tensor(0, steps, x_T).requires_grad_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x0 = adpm.sample(unet, x_T, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, solver="ddpm",
                     noise=noise, grad=grad)
    x0.square().mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"steps": steps, "grad": grad, "noise": noise_kind, "peak_MiB": peak / 1024, "growth_MiB": (peak - before) / 1024}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":  # (one configuration, in this process)
        print(json.dumps(child(int(sys.argv[2]), sys.argv[3], sys.argv[4])))
        return
    print(f"{'grad':9s} {'noise':10s} " + " ".join(f"peak N={n:<3d} (MiB)  growth" for n in STEPS))
    for grad, noise_kind in CONFIGS:
        rows = []
        for steps in STEPS:
            out = subprocess.run([sys.executable, __file__, "--child", str(steps), grad, noise_kind],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{grad:9s} {noise_kind:10s} " + " ".join(f"{r['peak_MiB']:14.1f} {r['growth_MiB']:9.1f}" for r in rows))


if __name__ == "__main__":
    main()
