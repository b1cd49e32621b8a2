"""The GPU suite: Stable-Diffusion-1.5-sized models, random weights, one optimisation step.

    python -m adjointdpm.bench gpu                 # on a CUDA machine: SD-1.5 sizes, 512², CFG 7.5
    python -m adjointdpm.bench gpu --reduced       # anywhere (CPU): tiny configs, 64², few steps, float32

The UNet2DConditionModel, AutoencoderKL and CLIPTextModel are built from Stable Diffusion 1.5's configs
(written below) with random weights, so nothing is downloaded. One optimisation step is

    x_0 = adjointdpm.sample(unet, x_T, cond=c, uncond=u, guidance_scale=7.5, solver=…, grad=mode)
    loss = mean((vae.decode(x_0 / 0.18215) − target)²);  loss.backward();  AdamW.step()

for each target — x_T, the text embeddings (cond and uncond, CLIP's output), LoRA adapters (peft, rank 4 on
the attention projections) and the full UNet weights — each solver setting (50 DDIM steps, 20
DPM-Solver++(2M) steps) and each method (adjoint, exact, checkpoint, reversible, backprop). It reports
peak GPU memory (``torch.cuda.max_memory_allocated`` over the measured step, which includes the weights
and the optimiser state) and seconds per step (after one warm-up step); out-of-memory is caught and
reported. Options: SDPA or classic attention, half-precision weights or bf16/fp16 autocast over float32
weights, batched or sequential classifier-free guidance, gradient checkpointing inside the VAE decoder and
inside the UNet. Full-weight fine-tuning always keeps float32 master weights (AdamW on half-precision
weights is not a real fine-tune) under the chosen autocast (bf16 by default).

On a machine without CUDA (``--reduced``) the same code runs on CPU and peak memory is the process's peak
RSS above the RSS before the step (see ``common.PeakRSS``).
"""

from __future__ import annotations

import argparse
import gc
import time
from contextlib import nullcontext

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", norm_num_groups=32, scaling_factor=0.18215,
)
SD15_CLIP = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1)

# --reduced: the same architecture families, tiny, 64×64 images (8×8 latents)
REDUCED_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
REDUCED_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32), act_fn="silu", norm_num_groups=8, scaling_factor=0.18215,
)
REDUCED_CLIP = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)

TARGETS = ("x_T", "text", "lora", "full")
MODES = ("adjoint", "exact", "checkpoint", "reversible", "backprop")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reduced", action="store_true",
                   help="tiny configs, 64×64, float32, few steps: proves the command on a CPU in a minute")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"default {','.join(TARGETS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"default {','.join(MODES)}")
    p.add_argument("--solvers", default="ddim,dpmpp2m", help="ddim (--ddim-steps) and/or dpmpp2m (--dpm-steps)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (default 50; 4 with --reduced)")
    p.add_argument("--dpm-steps", type=int, default=None, help="DPM-Solver++(2M) steps (default 20; 3 with --reduced)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="weight dtype for x_T / text / LoRA (default bf16 on CUDA, fp32 on CPU; fp16 overflows "
                        "in the random-weight SD UNet)")
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast for x_T / text / LoRA (use with --dtype fp32)")
    p.add_argument("--full-autocast", choices=("bf16", "fp16"), default="bf16",
                   help="autocast of the full-weight fine-tune (float32 master weights)")
    p.add_argument("--attention", choices=("sdpa", "classic"), default="sdpa")
    p.add_argument("--cfg", choices=("batched", "sequential"), default="batched",
                   help="classifier-free guidance in one batched call or two calls")
    p.add_argument("--vae-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing in the VAE decoder (default on)")
    p.add_argument("--unet-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing inside the UNet blocks (default off)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="measured steps after the warm-up (default 1)")
    p.add_argument("--out", default="outputs/bench/gpu.json")


class SequentialCFG(torch.nn.Module):
    """Runs the UNet once per half of the batch the engine builds for CFG: [uncond; cond] → two calls."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.config = unet.config

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False, **kwargs):
        outs = [self.unet(s, t, encoder_hidden_states=e, return_dict=False, **kwargs)[0]
                for s, t, e in zip(sample.chunk(2), timestep.chunk(2), encoder_hidden_states.chunk(2))]
        return (torch.cat(outs),)


def build_models(args, device, dtype, seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, clip_cfg = (REDUCED_UNET, REDUCED_VAE, REDUCED_CLIP) if args.reduced else \
        (SD15_UNET, SD15_VAE, SD15_CLIP)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    unet, vae, text_encoder = (m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, text_encoder))
    if args.attention == "classic":
        unet.set_attn_processor(AttnProcessor())
        vae.set_attn_processor(AttnProcessor())
    if args.vae_checkpointing:
        vae.enable_gradient_checkpointing()
    if args.unet_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, vae, text_encoder, clip_cfg


def _peak_context(device):
    if device.type == "cuda":
        return _CudaPeak()
    from .common import PeakRSS

    return PeakRSS()


class _CudaPeak:
    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline_mib = torch.cuda.memory_allocated() / 2**20
        self.method = "torch.cuda.max_memory_allocated (includes weights, grads, optimiser state)"
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak_mib = torch.cuda.max_memory_allocated() / 2**20


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(args, device, target, solver, steps, mode) -> dict:
    """One (target, solver, method): warm-up step, then ``repeats`` measured steps."""
    import adjointdpm as adpm
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    full = target == "full"
    dtype = torch.float32 if full else DTYPES[args.dtype]
    autocast = args.full_autocast if full else args.autocast
    unet, vae, text_encoder, clip_cfg = build_models(args, device, dtype)
    if target == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    model = SequentialCFG(unet) if args.cfg == "sequential" else unet
    scheduler = (DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False) if solver == "ddim"
                 else DPMSolverMultistepScheduler(**SD_BETAS))
    scheduler.set_timesteps(steps)
    schedule = adpm.VPSchedule.from_scheduler(scheduler)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, clip_cfg["vocab_size"], (1, clip_cfg["max_position_embeddings"]), generator=g)
    empty = torch.full_like(ids, clip_cfg["pad_token_id"])
    empty[:, 0] = clip_cfg["bos_token_id"]
    with torch.no_grad():
        cond = text_encoder(ids.to(device))[0].to(dtype)
        uncond = text_encoder(empty.to(device))[0].to(dtype)
    latent = (1, 4, unet.config.sample_size, unet.config.sample_size)
    x_T = torch.randn(latent, generator=g).to(device, dtype)
    size = unet.config.sample_size * 8
    image_target = torch.rand(1, 3, size, size, generator=g).to(device) * 2 - 1

    x_T.requires_grad_(target == "x_T")
    cond.requires_grad_(target == "text")
    uncond.requires_grad_(target == "text")
    if target == "lora":
        leaves = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in leaves:
            p.requires_grad_(True)
    elif full:
        leaves = list(unet.parameters())
        unet.requires_grad_(True)
    else:
        leaves = [x_T] if target == "x_T" else [cond, uncond]
    optimizer = torch.optim.AdamW(leaves, lr=1e-3)
    grad = {"adjoint": adpm.Adjoint(), "reversible": adpm.Reversible()}.get(mode, mode)
    amp = torch.autocast(device.type, DTYPES[autocast]) if autocast != "none" else nullcontext()

    def one_step():
        with amp:
            x0 = adpm.sample(model, x_T, schedule=schedule, timesteps=scheduler.timesteps, cond=cond, uncond=uncond,
                             guidance_scale=7.5, solver=solver, grad=grad)
            image = vae.decode(x0 / vae.config.scaling_factor).sample
            loss = (image.float() - image_target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    row = {"target": target, "solver": solver, "steps": steps, "mode": mode, "weights_dtype": str(dtype),
           "autocast": autocast, "trainable_parameters": sum(p.numel() for p in leaves)}
    try:
        one_step()  # warm-up: kernels, allocator, optimiser state
        times = []
        with _peak_context(device) as peak:
            for _ in range(args.repeats):
                _sync(device)
                start = time.perf_counter()
                row["loss"] = one_step()
                _sync(device)
                times.append(time.perf_counter() - start)
        row.update(status="ok", s_per_step=min(times), times_s=times, peak_mib=peak.peak_mib,
                   resident_before_mib=peak.baseline_mib, memory_method=peak.method)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="OOM", error=str(exc).splitlines()[0][:200])
    except MemoryError as exc:
        row.update(status="OOM", error=str(exc)[:200])
    finally:
        del model, unet, vae, text_encoder, optimizer, leaves
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(args) -> int:
    from .common import machine_info, write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.reduced:
        raise SystemExit("no CUDA device: the full-size GPU suite needs one; run with --reduced to test the command on CPU")
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    ddim_steps = args.ddim_steps or (4 if args.reduced else 50)
    dpm_steps = args.dpm_steps or (3 if args.reduced else 20)
    targets = [t for t in args.targets.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    bad = [t for t in targets if t not in TARGETS] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown target(s)/method(s) {bad}; targets {TARGETS}, methods {MODES}")
    result = {"suite": "gpu", "machine": machine_info(), "device": str(device),
              "options": {k: v for k, v in vars(args).items() if k != "command"}, "rows": []}
    started = time.time()
    for target in targets:
        for solver, steps in (("ddim", ddim_steps), ("dpmpp2m", dpm_steps)):
            if solver not in args.solvers.split(","):
                continue
            for mode in modes:
                if mode == "reversible" and solver != "ddim":
                    result["rows"].append({"target": target, "solver": solver, "steps": steps, "mode": mode,
                                           "status": "n/a (EDICT is DDIM-only)"})
                    continue
                row = run_config(args, device, target, solver, steps, mode)
                result["rows"].append(row)
                print(_row_line(row), flush=True)
                write_json(args.out, result)  # a run stopped by a time limit keeps what it measured
    result["wall_s"] = time.time() - started
    write_json(args.out, result)
    print()
    print(gpu_table(result))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


def _row_line(row) -> str:
    if row["status"] != "ok":
        return f"{row['target']:>5} {row['solver']:>8} {row['steps']:3d} {row['mode']:>10}: {row['status']}"
    return (f"{row['target']:>5} {row['solver']:>8} {row['steps']:3d} {row['mode']:>10}: "
            f"{row['peak_mib'] / 1024:7.3f} GiB  {row['s_per_step']:7.2f} s/step")


def gpu_table(result) -> str:
    """Markdown: one row per (target, solver), one column per method: 'peak GiB / s per step'."""
    modes = []
    for r in result["rows"]:
        if r["mode"] not in modes:
            modes.append(r["mode"])
    unit = "GiB" if result.get("device", "").startswith("cuda") else "GiB (CPU RSS)"
    lines = ["| target | solver, steps | " + " | ".join(f"{m}: peak {unit} / s per step" for m in modes) + " |",
             "|---|---|" + "---|" * len(modes)]
    keys = []
    for r in result["rows"]:
        if (r["target"], r["solver"], r["steps"]) not in keys:
            keys.append((r["target"], r["solver"], r["steps"]))
    for target, solver, steps in keys:
        cells = []
        for m in modes:
            row = next((r for r in result["rows"] if (r["target"], r["solver"], r["steps"], r["mode"]) ==
                        (target, solver, steps, m)), None)
            if row is None:
                cells.append("–")
            elif row["status"] != "ok":
                cells.append(row["status"])
            else:
                peak = row["peak_mib"] / 1024
                cells.append(f"{peak:.3f} / {row['s_per_step']:.2f}" if peak < 1 else
                             f"{peak:.2f} / {row['s_per_step']:.2f}")
        lines.append(f"| {target} | {solver}, {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
