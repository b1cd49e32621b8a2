"""The GPU suite: model families at their native sizes, random weights, one optimisation step each.

    python -m adjointdpm.bench gpu --family sd15,sdxl          # on a CUDA machine, bf16 weights
    python -m adjointdpm.bench gpu --family sd15 --compile off,on --modes exact,exact:inf,backprop
    python -m adjointdpm.bench gpu --reduced                    # anywhere (CPU): tiny configs, 64², few steps
    python -m adjointdpm.bench gpu --family sd15 --targets finetune --solvers dpmpp2m   # the fine-tuning methods

For each family (see ``family_configs.py``: SD-1.5 and SDXL UNets, SD3 and Flux flow-matching transformers;
conditioning as the engine takes it, e.g. SDXL's nested ``added_cond_kwargs``) and each target it measures, after one warm-up step, the peak memory and
the seconds of:

    forward  plain sampling (no graph) + VAE decode: what a step must be compared with
    x_T      x_0 = adjointdpm.sample(net, x_T, …, grad=mode); loss = mean((decode(x_0) − target)²);
             loss.backward(); AdamW step on x_T
    text     the same, AdamW on the text embeddings (cond and uncond)
    lora     the same, AdamW on peft LoRA adapters (rank --lora-rank on the attention projections)
    full     the same, AdamW on every network weight (float32 master weights under --full-autocast)
    finetune (only when asked for) one iteration of each fine-tuning method of ``--methods`` (``adjointdpm
             finetune``'s: method.backward, clipping, AdamW on a rank-4 LoRA) on a batch of ``--finetune-batch``,
             against one plain sample of that batch: model calls, seconds and peak memory above the memory
             resident before the iteration, each also as a ratio to the plain sample's (``finetune_cost.py``;
             reward: a fixed random linear functional of the decoded image)

for each solver setting (DDIM 50 steps on the UNets, Euler 28 steps on the flow-matching transformers;
DPM-Solver++(2M) 20 steps) and
each gradient mode (``exact``, ``exact:inf`` / ``exact:8GiB`` = ``Exact(memory=…)``, ``adjoint``,
``checkpoint``, ``reversible``, ``backprop``), with and without ``torch.compile`` of the network
(``--compile off,on``). The decode is ``adjointdpm.vae.decode`` (checkpointed; ``--vae-tile`` tiles it).
``--vae-sizes 1024`` adds decode + backward rows at that resolution: plain, checkpointed and tiled.
Peak memory is ``torch.cuda.max_memory_allocated`` over the measured step (weights, gradients and optimiser
state included); on CPU (``--reduced``) the process's peak RSS above the RSS before the step. An
out-of-memory step is caught and reported; every row is written to the JSON as soon as it is measured.
"""

from __future__ import annotations

import argparse
import gc
import time
from contextlib import nullcontext

import torch

from .family_configs import FAMILIES, SD_BETAS, build_network, build_vae

DEFAULT_TARGETS = ("forward", "x_T", "text", "lora", "full")
TARGETS = DEFAULT_TARGETS + ("finetune",)
MODES = ("adjoint", "exact", "checkpoint", "reversible", "backprop")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 1.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="sd15", help=f"comma-separated, of {','.join(FAMILIES)} (default sd15)")
    p.add_argument("--reduced", action="store_true",
                   help="tiny configs, 64×64, float32, few steps: proves the command on a CPU in a minute")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"of {','.join(TARGETS)} (default {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--modes", default="exact,adjoint,checkpoint,backprop",
                   help="gradient modes (default exact,adjoint,checkpoint,backprop; also reversible, and exact:SIZE "
                        "for Exact(memory=SIZE), e.g. exact:inf or exact:16GiB)")
    p.add_argument("--solvers", default="ddim,dpmpp2m", help="ddim (--ddim-steps) and/or dpmpp2m (--dpm-steps)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (default 50; 2 with --reduced)")
    p.add_argument("--dpm-steps", type=int, default=None, help="DPM-Solver++(2M) steps (default 20; 2 with --reduced)")
    p.add_argument("--compile", default="off", help="off, on or off,on: torch.compile of the network (default off)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="weight dtype for forward / x_T / text / LoRA (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast for forward / x_T / text / LoRA (use with --dtype fp32)")
    p.add_argument("--full-autocast", choices=("bf16", "fp16"), default="bf16",
                   help="autocast of the full-weight fine-tune (float32 master weights)")
    p.add_argument("--attention", choices=("sdpa", "classic"), default="sdpa")
    p.add_argument("--cfg", choices=("batched", "sequential"), default="batched",
                   help="classifier-free guidance in one batched call or two calls (UNet families)")
    p.add_argument("--vae-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="checkpointed VAE decoding, adjointdpm.vae.decode(checkpoint=True) (default on)")
    p.add_argument("--vae-tile", type=int, default=None, help="decode in tiles of this many latent pixels")
    p.add_argument("--vae-sizes", default="", help="image sizes for decode + backward rows, e.g. 1024 (default none)")
    p.add_argument("--unet-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="diffusers' gradient checkpointing inside the network's blocks (default off)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--methods", default=None, help="the finetune target's fine-tuning methods, comma-separated as "
                   "finetune's --method takes them (default exact,truncated:k=1,truncated:k=2,alignprop,onestep,"
                   "adjoint,adjoint-matching)")
    p.add_argument("--finetune-batch", type=int, default=None, help="the finetune target's batch (default 2; 1 with "
                   "--reduced)")
    p.add_argument("--repeats", type=int, default=1, help="measured steps after the warm-up (default 1)")
    p.add_argument("--out", default="outputs/bench/gpu.json")


class SequentialCFG(torch.nn.Module):
    """Runs the UNet once per half of the batch the engine builds for CFG: [uncond; cond] → two calls."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.config = unet.config

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False, added_cond_kwargs=None, **kw):
        halves = [{k: v.chunk(2)[i] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
                  for i in range(2)]
        outs = [self.unet(s, t, encoder_hidden_states=e, added_cond_kwargs=a, return_dict=False, **kw)[0]
                for s, t, e, a in zip(sample.chunk(2), timestep.chunk(2), encoder_hidden_states.chunk(2), halves)]
        return (torch.cat(outs),)


def grad_mode(name: str):
    """A gradient mode from a name of --modes (``exact:SIZE`` = Exact(memory=SIZE))."""
    import adjointdpm as adpm

    if name.startswith("exact:"):
        return adpm.Exact(memory=name.split(":", 1)[1])
    return {"adjoint": adpm.Adjoint(), "reversible": adpm.Reversible()}.get(name, name)


def _mode_ok(name: str) -> bool:
    if name.startswith("exact:"):
        grad_mode(name)  # a bad size fails here
        return True
    return name in MODES


class Inputs:
    """Seeded random inputs of one family: latents, text embeddings (and pooled ones), an image target.

    ``x_T`` is what the network takes: (1, C, h, w) latents, or for Flux the 2×2-packed tokens (1, hw/4, 4C)."""

    def __init__(self, family, reduced, device, dtype, latent_channels):
        _, _, size, text_len, text_dim, pooled_dim = family.config(reduced)
        g = torch.Generator().manual_seed(1)
        self.family, self.size, self.latent = family, size, (1, latent_channels, size // 8, size // 8)
        x_T = torch.randn(*self.latent, generator=g)
        self.x_T = (pack_flux(x_T) if family.kind == "flux" else x_T).to(device, dtype)
        self.text = [torch.randn(1, text_len, text_dim, generator=g).to(device, dtype) for _ in range(2)]
        self.pooled = [None if pooled_dim is None else torch.randn(1, pooled_dim, generator=g).to(device, dtype)
                       for _ in range(2)]
        self.target = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)
        self.device, self.dtype = device, dtype

    def conditioning(self, text_grad: bool):
        """(cond, uncond) as the engine takes them for this family; the text tensors require grad if asked."""
        text = [t.clone().requires_grad_(text_grad) for t in self.text]
        pooled = [None if p is None else p.clone().requires_grad_(text_grad) for p in self.pooled]
        kind, name = self.family.kind, self.family.name
        if name == "sd15":
            return text[1], text[0]
        if name == "sdxl":
            ids = torch.tensor([[self.size, self.size, 0, 0, self.size, self.size]], device=self.device, dtype=self.dtype)
            return tuple({"encoder_hidden_states": text[i], "added_cond_kwargs": {"text_embeds": pooled[i], "time_ids": ids}}
                         for i in (1, 0))
        if kind == "sd3":
            return tuple({"encoder_hidden_states": text[i], "pooled_projections": pooled[i]} for i in (1, 0))
        side = self.latent[-1] // 2  # flux: positions of the packed tokens, guidance distilled into the network
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] += torch.arange(side)[:, None]
        img_ids[..., 2] += torch.arange(side)[None, :]
        cond = {"encoder_hidden_states": text[1], "pooled_projections": pooled[1],
                "txt_ids": torch.zeros(text[1].shape[1], 3, device=self.device, dtype=self.dtype),
                "img_ids": img_ids.reshape(-1, 3).to(self.device, self.dtype),
                "guidance": torch.full((1,), 3.5, device=self.device, dtype=self.dtype)}
        return cond, None

    def latents_for_vae(self, x0):
        return unpack_flux(x0, self.latent) if self.family.kind == "flux" else x0


def pack_flux(latents):
    """(B, C, h, w) → (B, hw/4, 4C): Flux's 2×2 patches as tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(tokens, latent_shape):
    b, c, h, w = latent_shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def sample_kwargs(family, inputs, solver, steps, cond, uncond):
    """Keyword arguments of adjointdpm.sample for a family: schedule, times, conditioning, guidance."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if family.kind == "unet":
        scheduler = (DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False) if solver == "ddim"
                     else DPMSolverMultistepScheduler(**SD_BETAS))
        scheduler.set_timesteps(steps)
    elif family.kind == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
    else:  # flux: resolution-dependent shift
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        tokens = inputs.x_T.shape[1]
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        scheduler.set_timesteps(steps, mu=mu)
    guidance = GUIDANCE[family.name]
    return dict(schedule=scheduler, timesteps=scheduler.timesteps, cond=cond,
                uncond=uncond if guidance != 1 else None, guidance_scale=guidance, solver=solver)


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


def _peak_context(device):
    if device.type == "cuda":
        return _CudaPeak()
    from .common import PeakRSS

    return PeakRSS()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prepare_network(args, family, device, dtype, target, compiled):
    from diffusers.models.attention_processor import AttnProcessor

    net = build_network(family, args.reduced, device, dtype)
    if args.attention == "classic" and family.kind == "unet":
        net.set_attn_processor(AttnProcessor())
    if args.unet_checkpointing:
        net.enable_gradient_checkpointing()
    if target == "lora":
        from peft import LoraConfig

        net.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for n, p in net.named_parameters():
            p.requires_grad_("lora_" in n)
    elif target == "full":
        net.requires_grad_(True)
    if compiled:
        net.compile()
    model = SequentialCFG(net) if args.cfg == "sequential" and family.kind == "unet" else net
    return net, model


def run_target(args, family, device, target, compiled, settings, modes, result, write) -> None:
    """Every (solver, mode) of one target on one network build."""
    import adjointdpm as adpm
    from adjointdpm.vae import decode

    full = target == "full"
    dtype = torch.float32 if full else DTYPES[args.dtype]
    autocast = args.full_autocast if full else args.autocast
    amp = torch.autocast(device.type, DTYPES[autocast]) if autocast != "none" else nullcontext()
    try:
        net, model = _prepare_network(args, family, device, dtype, target, compiled)
        vae = build_vae(family, args.reduced, device, dtype)
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        for solver, steps in settings:
            for mode in (["none"] if target == "forward" else modes):
                write({"family": family.name, "target": target, "solver": solver, "steps": steps, "mode": mode,
                       "compile": compiled, "status": "OOM building the models", "error": str(exc)[:200]})
        return
    inputs = Inputs(family, args.reduced, device, dtype, vae.config.latent_channels)
    for solver, steps in settings:
        for mode in (["none"] if target == "forward" else modes):
            row = {"family": family.name, "target": target, "solver": solver, "steps": steps, "mode": mode,
                   "compile": compiled, "weights_dtype": str(dtype), "autocast": autocast}
            if mode == "reversible" and solver != "ddim":
                write({**row, "status": "n/a (EDICT is DDIM-only)"})
                continue
            from adjointdpm.conditioning import floating_leaves

            x_T = inputs.x_T.clone().requires_grad_(target == "x_T")
            cond, uncond = inputs.conditioning(text_grad=target == "text")
            text_leaves = [t for t in floating_leaves(cond) + floating_leaves(uncond) if t.requires_grad]
            leaves = {"x_T": [x_T], "text": text_leaves, "forward": []}.get(
                target, [p for p in net.parameters() if p.requires_grad])
            row["trainable_parameters"] = sum(p.numel() for p in leaves)
            optimizer = torch.optim.AdamW(leaves, lr=1e-4) if leaves else None

            def one_step():
                kwargs = sample_kwargs(family, inputs, solver, steps, cond, uncond)
                if target == "forward":
                    with torch.no_grad(), amp:
                        x0 = adpm.sample(model, x_T, grad=None, **kwargs)
                        decode(vae, inputs.latents_for_vae(x0), checkpoint=False, tile=args.vae_tile)
                    return float("nan")
                with amp:
                    x0 = adpm.sample(model, x_T, grad=grad_mode(mode), **kwargs)
                    image = decode(vae, inputs.latents_for_vae(x0), checkpoint=args.vae_checkpointing, tile=args.vae_tile)
                    loss = (image.float() - inputs.target).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss.item()

            try:
                one_step()  # warm-up: kernels, allocator, optimiser state, compilation
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
            except NotImplementedError as exc:
                row.update(status=f"n/a: {exc}")
            except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                row.update(status="OOM", error=str(exc).splitlines()[0][:200] if str(exc) else "")
            except Exception as exc:  # one failing cell must not cost the rest of a GPU lease
                row.update(status=f"error: {type(exc).__name__}: {str(exc)[:160]}")
            finally:
                del optimizer, leaves
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            write(row)
    del net, model, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def vae_rows(args, family, device, size, write) -> None:
    """Decode + backward at ``size``²: plain, checkpointed, tiled (in this process, one after the other)."""
    from .vae import measure_decode

    dtype = DTYPES[args.dtype]
    vae = build_vae(family, args.reduced, device, dtype)
    for variant in ("plain", "checkpoint", "tiled"):
        row = {"family": family.name, "target": "vae_decode", "solver": f"{size}²", "steps": 0, "mode": variant,
               "compile": False}
        try:
            out = measure_decode(vae, size, variant, args.vae_tile, device)
            row.update(status="ok", s_per_step=out["seconds"], peak_mib=out["peak_mib"], tile=out["tile"],
                       memory_method=out["memory_method"] + " above the memory before the decode")
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            row.update(status="OOM", error=str(exc).splitlines()[0][:200] if str(exc) else "")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(row)


def main(args) -> int:
    from .common import machine_info, write_json, write_report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.reduced:
        raise SystemExit("no CUDA device: the full-size GPU suite needs one; run with --reduced to test the command on CPU")
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    families = [f for f in args.family.split(",") if f]
    targets = [t for t in args.targets.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    compiles = {"off": [False], "on": [True], "off,on": [False, True], "on,off": [True, False]}.get(args.compile)
    bad = ([f for f in families if f not in FAMILIES] + [t for t in targets if t not in TARGETS]
           + [m for m in modes if not _mode_ok(m)])
    if bad or compiles is None:
        raise SystemExit(f"unknown family/target/mode/--compile {bad or args.compile}; families {tuple(FAMILIES)}, "
                         f"targets {TARGETS}, modes {MODES} or exact:SIZE, --compile off|on|off,on")
    if args.methods:  # (a misspelt method fails now, not after the models are built)
        from ..finetuning import MethodError, parse_method

        for spec in args.methods.split(","):
            try:
                parse_method(spec)
            except MethodError as e:
                raise SystemExit(f"--methods: {e}")

    def settings_of(family):
        """(solver, steps): DDIM / Euler (50 steps for the UNets, 28 for the flow models), DPM-Solver++(2M) 20."""
        ddim_steps = args.ddim_steps or (2 if args.reduced else 50 if family.kind == "unet" else 28)
        dpm_steps = args.dpm_steps or (2 if args.reduced else 20)
        return [(s, n) for s, n in (("ddim", ddim_steps), ("dpmpp2m", dpm_steps)) if s in args.solvers.split(",")]
    result = {"suite": "gpu", "machine": machine_info(), "device": str(device),
              "options": {k: v for k, v in vars(args).items() if k != "command"}, "rows": []}
    started = time.time()

    def write(row):
        result["rows"].append(row)
        print(_row_line(row), flush=True)
        write_json(args.out, result)  # a run stopped by a time limit keeps what it measured

    for name in families:
        family = FAMILIES[name]
        for size in (int(s) for s in args.vae_sizes.split(",") if s):
            vae_rows(args, family, device, size, write)
        for compiled in compiles:
            for target in targets:
                if target == "finetune":
                    if compiled == compiles[0]:  # (the network is not compiled for it: once per family)
                        finetune_rows(args, family, device, settings_of(family), write)
                    continue
                run_target(args, family, device, target, compiled, settings_of(family), modes, result, write)
    result["wall_s"] = time.time() - started
    write_report(args.out, result, gpu_table(result))
    return 0


def finetune_rows(args, family, device, settings, write) -> None:
    """The finetune target: per (solver, steps), the plain sample and one iteration of each method, measured
    in this process (finetune_cost.measure_in_process), each row with its ratios to the plain sample."""
    from .finetune_cost import METHOD_SPECS, SAMPLE, family_case, measure_in_process, rows_of

    specs = [SAMPLE] + ([m for m in args.methods.split(",") if m] if args.methods else list(METHOD_SPECS))
    batch = args.finetune_batch or (1 if args.reduced else 2)
    dtype = DTYPES[args.dtype]
    for solver, steps in settings:
        head = {"family": family.name, "target": "finetune", "solver": solver, "steps": steps, "compile": False,
                "weights_dtype": str(dtype), "batch": batch}
        try:
            case = family_case(family.name, args.reduced, device, dtype, batch, solver, steps)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            for spec in specs:
                write({**head, "mode": spec, "status": "OOM building the models", "error": str(exc)[:200]})
            continue
        measured = measure_in_process(case, specs, args.repeats)
        for row in rows_of(family.name, specs, measured):
            spec = row.pop("method")
            row.pop("model")
            out = {**head, "mode": spec, **row, "settings": case.settings}
            if row["status"] == "ok":
                out.update(s_per_step=row["seconds"], peak_above_resident_mib=row["peak_mib"],
                           peak_mib=row.get("peak_total_mib", row["peak_mib"]))
            write(out)
        del case, measured
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def finetune_table(result) -> str:
    """Markdown of the finetune target: per family and sampler, each method's calls, seconds and peak memory
    above the resident memory, with the ratios to the plain sample (and the total peak)."""
    unit = "GiB" if result.get("device", "").startswith("cuda") else "GiB (CPU RSS)"
    lines = [f"| family | sampler | method | model calls (× sample) | s / iteration (× sample) | peak above resident "
             f"{unit} (× sample) | peak total {unit} |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["target"] != "finetune":
            continue
        head = f"| {r['family']} | {r['solver']}, {r['steps']} | {r['mode']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status'][:60]} | | | |")
            continue
        q = r.get("ratios", {})
        lines.append(f"{head} {r['model_calls']:g} ({q.get('model_calls', float('nan')):.2f}) | {r['seconds']:.2f} "
                     f"({q.get('seconds', float('nan')):.2f}) | {r['peak_above_resident_mib'] / 1024:.3f} "
                     f"({q.get('peak_mib', float('nan')):.1f}) | {r['peak_mib'] / 1024:.3f} |")
    return "\n".join(lines)


def _row_line(row) -> str:
    head = (f"{row['family']:>5} {row['target']:>10} {row['solver']:>8} {row['steps']:3d} {row['mode']:>12} "
            f"{'compiled' if row.get('compile') else '':>8}")
    if row["status"] != "ok":
        return f"{head}: {row['status']}"
    line = f"{head}: {row['peak_mib'] / 1024:7.3f} GiB  {row['s_per_step']:7.2f} s/step"
    if row["target"] == "finetune" and "ratios" in row:
        q = row["ratios"]
        line += (f"  {row['model_calls']:g} calls; × sample: calls {q['model_calls']:.2f}, s {q['seconds']:.2f}, "
                 f"peak above resident {q['peak_mib']:.1f}")
    return line


def gpu_table(result) -> str:
    """Markdown: one row per (family, target, solver, compile), one column per mode: 'peak GiB / s per step';
    the finetune target's rows in their own table (:func:`finetune_table`)."""
    tables = []
    if any(r["target"] != "finetune" for r in result["rows"]):
        tables.append(_modes_table(result))
    if any(r["target"] == "finetune" for r in result["rows"]):
        tables.append(finetune_table(result))
    return "\n\n".join(tables)


def _modes_table(result) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"] if r["target"] != "finetune"))
    unit = "GiB" if result.get("device", "").startswith("cuda") else "GiB (CPU RSS)"
    lines = ["| family | target | solver, steps | compiled | " + " | ".join(f"{m}: peak {unit} / s" for m in modes) + " |",
             "|---|---|---|---|" + "---|" * len(modes)]
    keys = list(dict.fromkeys((r["family"], r["target"], r["solver"], r["steps"], bool(r.get("compile")))
                              for r in result["rows"] if r["target"] != "finetune"))
    for family, target, solver, steps, compiled in keys:
        cells = []
        for m in modes:
            row = next((r for r in result["rows"] if (r["family"], r["target"], r["solver"], r["steps"],
                                                      bool(r.get("compile")), r["mode"]) ==
                        (family, target, solver, steps, compiled, m)), None)
            if row is None:
                cells.append("–")
            elif row["status"] != "ok":
                cells.append(row["status"][:60])
            else:
                peak = row["peak_mib"] / 1024
                cells.append(f"{peak:.3f} / {row['s_per_step']:.2f}" if peak < 1 else f"{peak:.2f} / {row['s_per_step']:.2f}")
        lines.append(f"| {family} | {target} | {solver}, {steps} | {'yes' if compiled else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
