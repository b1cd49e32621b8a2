"""Model families of the GPU suite at their native sizes (and tiny ``reduced`` versions for a CPU).

Every network is built from its published architecture config with random weights (the cost of a step
does not depend on the weights), so nothing is downloaded:

    sd15   UNet2DConditionModel, Stable Diffusion 1.5 (860 M), 512² (64² × 4 latents), CLIP-L text 77 × 768
    sdxl   UNet2DConditionModel, SDXL base (2.6 G), 1024² (128² × 4), text 77 × 2048 + pooled 1280 + time ids
    sd3    SD3Transformer2DModel, SD3-medium (2 G), 1024² (128² × 16), text 333 × 4096 + pooled 2048
    flux   FluxTransformer2DModel, Flux-dev (12 G), 1024² (128² × 16 packed to 4096 × 64), text 512 × 4096
           + pooled 768, guidance embedding

The VAEs are AutoencoderKL with each family's config (4 or 16 latent channels, 8× upsampling).
Text embeddings are seeded random tensors of the encoders' output shapes: the text encoders run once per
optimisation step, outside the sampler, and the suite measures the sampler's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SD3_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
_VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
                   in_channels=3, out_channels=3)
SD15_VAE = dict(_VAE_BLOCKS, latent_channels=4, sample_size=512, scaling_factor=0.18215)
SDXL_VAE = dict(_VAE_BLOCKS, latent_channels=4, sample_size=1024, scaling_factor=0.13025)
SD3_VAE = dict(_VAE_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE = dict(_VAE_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)

# the same families, tiny: 64×64 images (8×8 latents), for a CPU in seconds
_TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(16, 16, 32, 32), layers_per_block=1, act_fn="silu", norm_num_groups=8,
                 in_channels=3, out_channels=3, sample_size=64)
REDUCED_VAE = dict(_TINY_VAE, latent_channels=4, scaling_factor=0.18215)
REDUCED = {
    "sd15": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8),
    "sdxl": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 attention_head_dim=(4, 8), cross_attention_dim=32, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=88,
                 norm_num_groups=8),
    "sd3": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                pos_embed_max_size=16),
    "flux": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
}
REDUCED_VAES = {"sd15": REDUCED_VAE, "sdxl": REDUCED_VAE,
                "sd3": dict(_TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                            use_quant_conv=False, use_post_quant_conv=False),
                "flux": dict(_TINY_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                             use_quant_conv=False, use_post_quant_conv=False)}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "unet" (VP noise prediction) or "sd3" / "flux" (flow-matching transformers)
    network: dict
    vae: dict
    resolution: int
    text_len: int
    text_dim: int
    pooled_dim: int | None = None
    reduced_text: tuple[int, int, int | None] = (4, 32, None)  # text_len, text_dim, pooled_dim of --reduced
    extra: dict = field(default_factory=dict)

    def config(self, reduced: bool) -> tuple[dict, dict, int, int, int, int | None]:
        """(network config, VAE config, image size, text length, text width, pooled width)."""
        if reduced:
            return (REDUCED[self.name], REDUCED_VAES[self.name], 64, *self.reduced_text)
        return self.network, self.vae, self.resolution, self.text_len, self.text_dim, self.pooled_dim


FAMILIES = {
    "sd15": Family("sd15", "unet", SD15_UNET, SD15_VAE, 512, 77, 768, reduced_text=(4, 32, None)),
    "sdxl": Family("sdxl", "unet", SDXL_UNET, SDXL_VAE, 1024, 77, 2048, 1280, reduced_text=(4, 32, 40)),
    "sd3": Family("sd3", "sd3", SD3_TRANSFORMER, SD3_VAE, 1024, 333, 4096, 2048, reduced_text=(4, 32, 16)),
    "flux": Family("flux", "flux", FLUX_TRANSFORMER, FLUX_VAE, 1024, 512, 4096, 768, reduced_text=(4, 32, 16)),
}


def build_network(family: Family, reduced: bool, device, dtype) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family.kind]
    torch.manual_seed(0)
    with torch.device(device):
        net = cls(**family.config(reduced)[0])
    return net.to(device, dtype).eval().requires_grad_(False)


def build_vae(family: Family, reduced: bool, device, dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no note about casting a randomly initialised VAE

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**family.config(reduced)[1])
    return vae.to(device, dtype).eval().requires_grad_(False)
