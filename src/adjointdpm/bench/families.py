"""Gradient cost per model family on reduced configs (CPU): SD-1.5-, SDXL-, SD3-, Flux- and PixArt-shaped
networks with random weights, built from configs at a fraction of their native widths.

For each family, with its own scheduler and guidance as its pipeline samples (N steps), one run measures

* the forward sample (no graph): seconds;
* an x_T step: ``exact`` and ``backprop`` gradients of a loss on x_0 w.r.t. x_T: seconds and peak RSS;
* a LoRA step: the same w.r.t. rank-4 peft LoRA adapters on every attention projection.

Every path runs once before it is timed (first-call allocations and lazy initialisation).

Each ratio (gradient time / forward time, exact / backprop) comes from one run, in one process, with the
peak RSS above the process's baseline (``PeakRSS``: VmHWM after clear_refs where the kernel allows it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .common import PeakRSS, machine_info, write_report

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "pixart")


@dataclass
class FamilySetup:
    name: str
    network: torch.nn.Module
    x_T: torch.Tensor
    cond: object
    uncond: object
    guidance: float
    scheduler: object
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def _vp_scheduler(steps: int):
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(steps)
    return s


def _flow_scheduler(steps: int, dynamic: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        s.set_timesteps(steps, mu=0.8)
    else:
        s = FlowMatchEulerDiscreteScheduler(shift=3.0)
        s.set_timesteps(steps)
    return s


def build(name: str, steps: int, batch: int = 1, seed: int = 0) -> FamilySetup:
    import diffusers

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if name in ("sd15", "sdxl"):
        extra = {}
        if name == "sdxl":
            extra = dict(addition_embed_type="text_time", addition_time_embed_dim=16,
                         projection_class_embeddings_input_dim=64 + 6 * 16, use_linear_projection=True)
        net = diffusers.UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            norm_num_groups=8, attention_head_dim=8, **extra)

        def emb():
            if name == "sd15":
                return randn(batch, 16, 64)
            return {"encoder_hidden_states": randn(batch, 16, 64),
                    "added_cond_kwargs": {"text_embeds": randn(batch, 64), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}}
        return FamilySetup(name, net, randn(batch, 4, 32, 32), emb(), emb(), 7.5, _vp_scheduler(steps))
    if name == "sd3":
        net = diffusers.SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                                              joint_attention_dim=64, pooled_projection_dim=32, out_channels=16)

        def emb():
            return {"encoder_hidden_states": randn(batch, 16, 64), "pooled_projections": randn(batch, 32)}
        return FamilySetup(name, net, randn(batch, 16, 32, 32), emb(), emb(), 7.0, _flow_scheduler(steps))
    if name == "flux":
        net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                               attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                               pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        side = 16  # 32x32 latents of 16 channels, packed 2x2 -> 256 tokens of 64 features
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        cond = {"encoder_hidden_states": randn(batch, 16, 64), "pooled_projections": randn(batch, 32),
                "txt_ids": torch.zeros(16, 3), "img_ids": ids.reshape(-1, 3), "guidance": torch.full((batch,), 3.5)}
        return FamilySetup(name, net, randn(batch, side * side, 64), cond, None, 1.0, _flow_scheduler(steps, True))
    if name == "pixart":
        net = diffusers.PixArtTransformer2DModel(
            sample_size=32, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=4, caption_channels=64,
            in_channels=4, cross_attention_dim=64, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)

        def emb():
            return {"encoder_hidden_states": randn(batch, 16, 64), "encoder_attention_mask": torch.ones(batch, 16),
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        return FamilySetup(name, net, randn(batch, 4, 32, 32), emb(), emb(), 4.5, _vp_scheduler(steps))
    raise SystemExit(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")


def _sample(setup: FamilySetup, x_T, grad):
    import adjointdpm as adpm

    solver = "dpmpp2m" if "DPMSolver" in type(setup.scheduler).__name__ else "ddim"
    return adpm.sample(setup.network, x_T, schedule=setup.scheduler, timesteps=setup.scheduler.timesteps,
                       cond=setup.cond, uncond=setup.uncond if setup.guidance != 1 else None,
                       guidance_scale=setup.guidance, solver=solver, grad=grad)


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    with PeakRSS() as peak:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, peak.peak_mib


def measure(name: str, steps: int) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    setup = build(name, steps)
    net = setup.network.eval().requires_grad_(False)
    row = {"family": name, "steps": steps, "parameters": sum(p.numel() for p in net.parameters()),
           "scheduler": type(setup.scheduler).__name__, "guidance_scale": setup.guidance}
    _sample(setup, setup.x_T, None)  # warm-up
    row["forward_s"], row["forward_mib"] = _timed(lambda: _sample(setup, setup.x_T, None))

    def x_step(grad):
        x = setup.x_T.clone().requires_grad_()
        _sample(setup, x, grad).square().mean().backward()

    x_step("backprop")  # warm-up of the backward path
    for grad in ("exact", "backprop"):
        row[f"x_T_{grad}_s"], row[f"x_T_{grad}_mib"] = _timed(lambda: x_step(grad))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=list(setup.lora_targets)), net)
    lora = [p for n, p in net.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    row["lora_parameters"] = sum(p.numel() for p in lora)

    def lora_step(grad):
        net.zero_grad(set_to_none=True)
        _sample(setup, setup.x_T, grad).square().mean().backward()

    lora_step("backprop")
    for grad in ("exact", "backprop"):
        row[f"lora_{grad}_s"], row[f"lora_{grad}_mib"] = _timed(lambda: lora_step(grad))
    for what in ("x_T", "lora"):
        row[f"{what}_exact_over_forward"] = row[f"{what}_exact_s"] / row["forward_s"]
        row[f"{what}_exact_over_backprop"] = row[f"{what}_exact_s"] / row[f"{what}_backprop_s"]
    return row


def table(result: dict) -> str:
    lines = ["| family | params | scheduler | N | forward s | x_T exact s (MiB) | x_T backprop s (MiB) | "
             "LoRA exact s (MiB) | LoRA backprop s (MiB) | x_T exact/fwd | LoRA exact/fwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['family']} | {r['parameters'] / 1e6:.2f} M | {r['scheduler']} | {r['steps']} | {r['forward_s']:.2f} | "
            f"{r['x_T_exact_s']:.2f} ({r['x_T_exact_mib']:.0f}) | {r['x_T_backprop_s']:.2f} ({r['x_T_backprop_mib']:.0f}) | "
            f"{r['lora_exact_s']:.2f} ({r['lora_exact_mib']:.0f}) | {r['lora_backprop_s']:.2f} ({r['lora_backprop_mib']:.0f}) | "
            f"{r['x_T_exact_over_forward']:.2f} | {r['lora_exact_over_forward']:.2f} |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--families", default=",".join(FAMILIES), help=f"families to measure (default {','.join(FAMILIES)})")
    p.add_argument("--steps", type=int, default=10, help="sampling steps N (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="outputs/bench/families.json", help="results JSON")


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name in [f.strip() for f in args.families.split(",") if f.strip()]:
        print(f"measuring {name} …", flush=True)
        rows.append(measure(name, args.steps))
    result = {"suite": "families", "machine": machine_info(), "rows": rows, "wall_s": time.perf_counter() - start}
    write_report(args.out, result, table(result), minutes=True)
    return 0
