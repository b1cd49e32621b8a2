"""Tiny random-weight networks of every diffusers model family, in float64, with conditioning built the
way each family's pipeline builds it and the pipeline's own guided network call (the reference the engine
is compared with; written from the pipelines, independently of the engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel)

from conftest import SD_BETAS

F64 = torch.float64


def _randn(gen, *shape):
    return torch.randn(*shape, dtype=F64, generator=gen)


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator, int], tuple]  # -> (x_T, cond, uncond)
    call: Callable  # (net, x, t, cond, uncond, w) -> guided model output, as the pipeline computes it
    guidance: float
    flow: bool

    def network(self):
        torch.manual_seed(0)
        return self.build().double().eval()


# ---------------------------------------------------------------------------- SDXL
def _sdxl():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
    )


def _sdxl_inputs(gen, batch):
    def emb():
        return {"encoder_hidden_states": _randn(gen, batch, 3, 16),
                "added_cond_kwargs": {"text_embeds": _randn(gen, batch, 8), "time_ids": _randn(gen, 1, 6).abs() * 8}}
    cond, uncond = emb(), emb()
    uncond["added_cond_kwargs"]["time_ids"] = cond["added_cond_kwargs"]["time_ids"]
    return _randn(gen, batch, 4, 8, 8), cond, uncond


def _sdxl_call(net, x, t, cond, uncond, w):
    b = x.shape[0]
    cat = lambda u, c: torch.cat([u.expand(b, *u.shape[1:]), c.expand(b, *c.shape[1:])])
    added = {k: cat(uncond["added_cond_kwargs"][k], cond["added_cond_kwargs"][k]) for k in ("text_embeds", "time_ids")}
    out = net(torch.cat([x, x]), t, encoder_hidden_states=cat(uncond["encoder_hidden_states"], cond["encoder_hidden_states"]),
              added_cond_kwargs=added).sample
    u, c = out.chunk(2)
    return u + w * (c - u)


# ---------------------------------------------------------------------------- SD3
def _sd3():
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4,
                                 num_attention_heads=2, caption_projection_dim=8, joint_attention_dim=16,
                                 pooled_projection_dim=12, out_channels=4)


def _sd3_inputs(gen, batch):
    def emb():
        return {"encoder_hidden_states": _randn(gen, batch, 3, 16), "pooled_projections": _randn(gen, batch, 12)}
    return _randn(gen, batch, 4, 8, 8), emb(), emb()


def _sd3_call(net, x, t, cond, uncond, w):
    out = net(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]),
              encoder_hidden_states=torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]),
              pooled_projections=torch.cat([uncond["pooled_projections"], cond["pooled_projections"]])).sample
    u, c = out.chunk(2)
    return u + w * (c - u)


# ---------------------------------------------------------------------------- Flux (guidance-distilled)
def _flux():
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=4,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12,
                                  guidance_embeds=True, axes_dims_rope=(0, 2, 2))


def _flux_inputs(gen, batch):
    # latents 4 channels 8x8 packed into 16 tokens of 2x2x4 = 16 features
    img_ids = torch.zeros(4, 4, 3, dtype=F64)
    img_ids[..., 1] += torch.arange(4, dtype=F64)[:, None]
    img_ids[..., 2] += torch.arange(4, dtype=F64)[None, :]
    cond = {"encoder_hidden_states": _randn(gen, batch, 3, 16), "pooled_projections": _randn(gen, batch, 12),
            "txt_ids": torch.zeros(3, 3, dtype=F64), "img_ids": img_ids.reshape(16, 3),
            "guidance": torch.full((batch,), 3.5, dtype=F64)}
    return _randn(gen, batch, 16, 16), cond, None


def _flux_call(net, x, t, cond, uncond, w):
    return net(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000, **cond).sample


# ---------------------------------------------------------------------------- PixArt (learned variance)
def _pixart():
    return PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                                    caption_channels=16, in_channels=4, cross_attention_dim=8, out_channels=8,
                                    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)


def _pixart_inputs(gen, batch):
    def emb(mask):
        return {"encoder_hidden_states": _randn(gen, batch, 3, 16), "encoder_attention_mask": mask,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return _randn(gen, batch, 4, 8, 8), emb(torch.tensor([[1, 1, 0]] * batch)), emb(torch.tensor([[1, 0, 0]] * batch))


def _pixart_call(net, x, t, cond, uncond, w):
    out = net(torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]),
              encoder_attention_mask=torch.cat([uncond["encoder_attention_mask"], cond["encoder_attention_mask"]]),
              timestep=t.expand(2 * x.shape[0]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    u, c = out.chunk(2)
    return (u + w * (c - u)).chunk(2, dim=1)[0]


# ---------------------------------------------------------------------------- DiT (class labels, learned variance)
def _dit():
    return DiTTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                                 in_channels=4, out_channels=8, num_embeds_ada_norm=10, norm_num_groups=2)


def _dit_inputs(gen, batch):
    labels = torch.arange(batch) % 10
    return _randn(gen, batch, 4, 8, 8), {"class_labels": labels}, {"class_labels": torch.full((batch,), 10)}


def _dit_call(net, x, t, cond, uncond, w):
    out = net(torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]),
              class_labels=torch.cat([uncond["class_labels"], cond["class_labels"]])).sample
    eps = out[:, :4]
    u, c = eps.chunk(2)
    return u + w * (c - u)


FAMILIES = {
    f.name: f
    for f in (
        Family("sdxl", _sdxl, _sdxl_inputs, _sdxl_call, 3.0, False),
        Family("sd3", _sd3, _sd3_inputs, _sd3_call, 3.0, True),
        Family("flux", _flux, _flux_inputs, _flux_call, 1.0, True),
        Family("pixart", _pixart, _pixart_inputs, _pixart_call, 3.0, False),
        Family("dit", _dit, _dit_inputs, _dit_call, 3.0, False),
    )
}


def schedulers(family: Family) -> dict[str, Callable[[int], object]]:
    """Configured diffusers schedulers the engine must reproduce for this family, by name: steps -> scheduler."""
    if family.flow:
        def flow_euler(n):
            s = FlowMatchEulerDiscreteScheduler(shift=3.0)
            s.set_timesteps(n)
            return s

        def flow_dynamic(n):
            s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
            s.set_timesteps(n, mu=0.8)
            return s

        def flow_dpm(n):
            s = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                            final_sigmas_type="zero")
            s.set_timesteps(n)
            return s

        return {"flowmatch_euler": flow_euler, "flowmatch_dynamic": flow_dynamic, "dpm_flow": flow_dpm}

    def ddim(n):
        s = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        s.set_timesteps(n)
        return s

    def euler_linspace(n):
        s = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace")
        s.set_timesteps(n)
        return s

    def euler_leading(n):
        s = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
        s.set_timesteps(n)
        return s

    def dpm(n):
        s = DPMSolverMultistepScheduler(**SD_BETAS)
        s.set_timesteps(n)
        return s

    def dpm_karras(n):
        s = DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True)
        s.set_timesteps(n)
        return s

    return {"ddim": ddim, "euler_linspace": euler_linspace, "euler_leading": euler_leading, "dpm": dpm,
            "dpm_karras": dpm_karras}


SOLVER_OF = {"ddim": "ddim", "euler_linspace": "ddim", "euler_leading": "ddim", "dpm": "dpmpp2m",
             "dpm_karras": "dpmpp2m", "flowmatch_euler": "ddim", "flowmatch_dynamic": "ddim", "dpm_flow": "dpmpp2m"}


def diffusers_loop(family: Family, net, scheduler, x_T, cond, uncond):
    """The pipeline's denoising loop: latents·init_noise_sigma, scale_model_input, guided call, step
    (flow-matching pipelines use neither of the first two: their schedulers have none)."""
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = family.call(net, x_in, t, cond, uncond, family.guidance)
            x = scheduler.step(out, t, x).prev_sample
    return x
