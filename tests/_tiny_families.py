"""Builds tiny random-weight diffusers folders of the SDXL, SD3, Flux and PixArt layouts for tests.

Each builder writes a real pipeline folder - ``model_index.json``, one subfolder per component with
its config and safetensors weights, tokenizers built offline - that the diffusers pipeline class
itself opens with ``from_pretrained(folder, local_files_only=True)``. Widths are 8-32 and latent
grids 8x8 (16 px images through a 2x VAE), so a folder builds in about a second. The component
configs follow diffusers' own pipeline tests (their ``get_dummy_components``), only smaller.

Tokenizers: the CLIP ones are ``adjointdpm.embedded.text``'s word-level BPE (``model_max_length``
12); the T5 one is a Unigram tokenizer over the same words, built with the ``tokenizers`` library
through ``transformers.T5Tokenizer(vocab=...)`` and saved as ``tokenizer.json``.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CLIP_LENGTH = 12
FLOW_BETAS = dict(shift=3.0)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


# ---------------------------------------------------------------------- text
def clip_tokenizer(folder: Path):
    from adjointdpm.embedded.text import write_tokenizer

    write_tokenizer(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = CLIP_LENGTH
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def clip_encoder(hidden: int, projection: int | None = None, seed: int = 0):
    """A one-layer CLIP text encoder; with ``projection`` the ``CLIPTextModelWithProjection``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from adjointdpm.embedded.text import BOS, EOS, vocab_and_merges

    vocab, _ = vocab_and_merges()
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
                         projection_dim=projection or hidden, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                         pad_token_id=vocab[EOS])
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def t5_vocab() -> list[tuple[str, float]]:
    from adjointdpm.embedded.text import WORDS

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = [("\u2581" + w, -3.0) for w in WORDS]
    chars = [(ch, -6.0) for ch in string.ascii_lowercase + string.digits]
    return specials + words + chars


def t5_tokenizer(folder: Path):
    from transformers import T5Tokenizer

    T5Tokenizer(vocab=t5_vocab(), extra_ids=0).save_pretrained(folder)


def t5_encoder(d_model: int = 32, seed: int = 1):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(t5_vocab()), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **kw)


# ---------------------------------------------------------------------- writing
def _save(root: Path, index: dict, **parts) -> Path:
    """Save each component into its subfolder and write model_index.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            part.save_pretrained(root / name, safe_serialization=True)
        elif callable(part) and not hasattr(part, "save_pretrained"):  # a tokenizer writer
            part(root / name)
        else:
            part.save_pretrained(root / name)  # a scheduler
    (root / "model_index.json").write_text(json.dumps({"_diffusers_version": "0.42.1", **index}, indent=1))
    return root


def _lib(obj) -> list[str]:
    return ["transformers" if type(obj).__module__.startswith("transformers") else "diffusers", type(obj).__name__]


def _index(class_name: str, parts: dict, tokenizers: dict, **extra) -> dict:
    index = {"_class_name": class_name, **extra}
    index.update({k: _lib(v) for k, v in parts.items()})
    index.update(tokenizers)
    return index


# ---------------------------------------------------------------------- families
def build_tiny_sdxl(root: Path, force_zeros_for_empty_prompt: bool = True) -> Path:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 4 + 16,
        cross_attention_dim=32, norm_num_groups=4)
    sched = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    parts = dict(unet=unet, vae=vae(), text_encoder=clip_encoder(16, seed=3), text_encoder_2=clip_encoder(16, 16, seed=4),
                 scheduler=sched)
    toks = {"tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    index = _index("StableDiffusionXLPipeline", parts, toks, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                   image_encoder=[None, None], feature_extractor=[None, None])
    return _save(root, index, tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, **parts)


def build_tiny_sd3(root: Path, with_t5: bool = True, dynamic_shift: bool = False) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                        pooled_projection_dim=16, out_channels=4)
    sched = FlowMatchEulerDiscreteScheduler(**FLOW_BETAS, use_dynamic_shifting=dynamic_shift)
    parts = dict(transformer=transformer, vae=vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                                                  use_post_quant_conv=False),
                 text_encoder=clip_encoder(8, 8, seed=3), text_encoder_2=clip_encoder(8, 8, seed=4), scheduler=sched)
    writers = {"tokenizer": clip_tokenizer, "tokenizer_2": clip_tokenizer}
    toks = {"tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    if with_t5:
        parts["text_encoder_3"] = t5_encoder(32)
        writers["tokenizer_3"] = t5_tokenizer
        toks["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
        del toks["text_encoder_3"]
    index = _index("StableDiffusion3Pipeline", parts, toks, image_encoder=[None, None], feature_extractor=[None, None])
    return _save(root, index, **writers, **parts)


def build_tiny_flux(root: Path, guidance_embeds: bool = True) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
                                         guidance_embeds=guidance_embeds)
    sched = FlowMatchEulerDiscreteScheduler(**FLOW_BETAS, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    parts = dict(transformer=transformer, vae=vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                                  use_post_quant_conv=False),
                 text_encoder=clip_encoder(16, seed=3), text_encoder_2=t5_encoder(32), scheduler=sched)
    toks = {"tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"]}
    index = _index("FluxPipeline", parts, toks, image_encoder=[None, None], feature_extractor=[None, None])
    root = _save(root, index, tokenizer=clip_tokenizer, tokenizer_2=t5_tokenizer, **parts)
    # FluxPipeline's default is 1024 px whatever the network; the tiny model is sampled at 16 px
    (root / "adjointdpm.json").write_text(json.dumps({"height": 16, "width": 16}))
    return root


def build_tiny_pixart(root: Path, sigma: bool = True) -> Path:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    sched = (DPMSolverMultistepScheduler(**SD_BETAS) if sigma
             else DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1))
    parts = dict(transformer=transformer, vae=vae(), text_encoder=t5_encoder(32), scheduler=sched)
    toks = {"tokenizer": ["transformers", "T5TokenizerFast"]}
    index = _index("PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline", parts, toks)
    return _save(root, index, tokenizer=t5_tokenizer, **parts)


BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux, "pixart": build_tiny_pixart}
