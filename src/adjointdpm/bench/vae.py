"""The VAE-decoding benchmark (``python -m adjointdpm.bench vae``): memory of a differentiable decode.

For each resolution, Stable Diffusion's ``AutoencoderKL`` config (random weights) decodes a random latent and
the gradient of L = mean((image − target)²) with respect to the latent is computed, in one fresh process
per variant (forked from a helper that only imported the libraries, see ``zygote.py``):

    plain         vae.decode(z) under autograd (every intermediate kept for the backward pass)
    diffusers     diffusers' own gradient checkpointing of the decoder (one checkpoint per up-block)
    checkpoint    adjointdpm.vae.decode(checkpoint=True): one checkpoint per ResNet block, attention, upsampler
    tiled         adjointdpm.vae.decode(tile=T, checkpoint=True): T×T latent tiles, each checkpointed

Reported: the peak memory of decode + backward above the memory before it (peak RSS on CPU, see
``common.PeakRSS``; ``torch.cuda.max_memory_allocated`` on CUDA), the time, and each variant's latent gradient
against the plain decode's (relative error; the tiled decode is a slightly different function).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from .zygote import Zygote

VARIANTS = ("plain", "diffusers", "checkpoint", "tiled")


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="256", help="image sizes in pixels, comma-separated (default 256)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"default {','.join(VARIANTS)}")
    p.add_argument("--tile", type=int, default=None,
                   help="latent tile size of the tiled variant (default: half the latent, i.e. 4 tiles)")
    p.add_argument("--config", choices=("sd15", "reduced"), default="sd15",
                   help="Stable Diffusion's VAE config (default) or a tiny one (seconds, for tests)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    p.add_argument("--out", default="outputs/bench/vae.json", help="results JSON")


def build_vae(config: str, dtype: torch.dtype, device):
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no note about casting a randomly initialised VAE

    from .family_configs import REDUCED_VAE, SD15_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**(SD15_VAE if config == "sd15" else REDUCED_VAE))
    return vae.to(device, dtype).eval().requires_grad_(False)


def measure_decode(vae, size: int, variant: str, tile: int | None, device, grad_path: str | None = None) -> dict:
    """Peak memory and time of decode + backward of one variant at ``size``² pixels."""
    from adjointdpm.vae import decode

    from .common import PeakRSS

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, vae.config.latent_channels, size // factor, size // factor, generator=g)
    latents = latents.to(device, vae.dtype) * vae.config.scaling_factor
    target = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
    kwargs = {"plain": dict(checkpoint=False), "diffusers": dict(checkpoint=False),
              "checkpoint": dict(checkpoint=True),
              "tiled": dict(checkpoint=True, tile=tile or max(1, latents.shape[-1] // 2))}[variant]
    if variant == "diffusers":
        vae.enable_gradient_checkpointing()

    def step(z):
        z = z.clone().requires_grad_()
        image = decode(vae, z, **kwargs)
        loss = (image.float() - target[..., : image.shape[-2], : image.shape[-1]]).square().mean()
        loss.backward()
        return z.grad

    step(latents[..., :2, :2])  # warm-up: kernels, autograd's engine
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        grad = step(latents)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak_mib, method = (torch.cuda.max_memory_allocated() - before) / 2**20, "torch.cuda.max_memory_allocated"
    else:
        with PeakRSS() as peak:
            start = time.perf_counter()
            grad = step(latents)
            seconds = time.perf_counter() - start
        peak_mib, method = peak.peak_mib, peak.method
    if grad_path:
        torch.save(grad.float().cpu(), grad_path)
    return {"size": size, "variant": variant, "tile": kwargs.get("tile"), "peak_mib": peak_mib, "seconds": seconds,
            "memory_method": method, "status": "ok"}


def job_decode(job: dict) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    device = torch.device(job["device"])
    vae = build_vae(job["config"], dtype, device)
    return measure_decode(vae, job["size"], job["variant"], job["tile"], device, job.get("grad_path"))


JOBS = {"decode": job_decode}


def main(args) -> int:
    from .common import compare, machine_info, write_report

    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    result = {"suite": "vae", "machine": machine_info(), "options": {k: v for k, v in vars(args).items() if k != "command"},
              "rows": []}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="adjointdpm-vae-") as tmp, Zygote(jobs=__name__) as zygote:
        for size in (int(s) for s in args.sizes.split(",") if s):
            paths = {}
            for variant in variants:
                paths[variant] = os.path.join(tmp, f"{size}-{variant}.pt")
                row = zygote.run({"job": "decode", "size": size, "variant": variant, "tile": args.tile,
                                  "config": args.config, "dtype": args.dtype, "device": args.device,
                                  "threads": args.threads, "grad_path": paths[variant]}, 3600.0)
                if "error" in row:
                    row = {"size": size, "variant": variant, "status": row["error"]}
                result["rows"].append(row)
                print(_line(row), flush=True)
            if Path(paths.get("plain", "")).exists():
                plain = torch.load(paths["plain"], weights_only=True)
                for row in result["rows"]:
                    if row["size"] == size and Path(paths[row["variant"]]).exists():
                        row["grad_vs_plain"] = compare(torch.load(paths[row["variant"]], weights_only=True), plain)
    result["wall_s"] = time.time() - started
    write_report(args.out, result, vae_table(result))
    return 0


def _line(row) -> str:
    if row["status"] != "ok":
        return f"{row['size']:5d}² {row['variant']:>10}: {row['status']}"
    return f"{row['size']:5d}² {row['variant']:>10}: {row['peak_mib']:9.1f} MiB  {row['seconds']:7.2f} s"


def vae_table(result) -> str:
    lines = ["| image | variant | peak MiB (decode + backward) | s | × plain's peak | latent gradient vs plain (rel. error) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        plain = next((r for r in result["rows"] if r["size"] == row["size"] and r["variant"] == "plain"
                      and r["status"] == "ok"), None)
        if row["status"] != "ok":
            lines.append(f"| {row['size']}² | {row['variant']} | {row['status']} | | | |")
            continue
        ratio = f"{row['peak_mib'] / plain['peak_mib']:.2f}" if plain else "–"
        err = (row.get("grad_vs_plain") or {}).get("rel")
        tile = f" (tile {row['tile']})" if row.get("tile") else ""
        lines.append(f"| {row['size']}² | {row['variant']}{tile} | {row['peak_mib']:.0f} | {row['seconds']:.2f} | {ratio} | "
                     f"{'–' if err is None else format(err, '.1e')} |")
    return "\n".join(lines)
