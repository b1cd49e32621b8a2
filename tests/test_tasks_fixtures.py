"""Tiny random-weight model folders for the application tests (no tests here, only builders).

* ``build_tiny_pixel_model``: the embedded model's layout (pixel-space 16x16 UNet, word-level CLIP
  tokenizer and text encoder, ``adjointdpm.json`` settings, ``critics/``) at a fraction of its size; its
  UNet predicts x0 (``prediction_type="sample"``) so that random weights still give images in range.
* ``build_tiny_latent_model``: a Stable-Diffusion-layout folder (latent UNet + AutoencoderKL + CLIP text
  encoder + CLIPTokenizer + scheduler), no critics: the commands fall back to the embedded critics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _text(folder: Path, hidden: int, max_length: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    from adjointdpm.embedded.text import BOS, EOS, vocab_and_merges, write_tokenizer

    write_tokenizer(folder / "tokenizer")
    if max_length is not None:
        cfg = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
        cfg["model_max_length"] = max_length
        (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
    vocab, _ = vocab_and_merges()
    torch.manual_seed(1)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length or 16,
                                      bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)


def _index(folder: Path, sched: str, vae: bool) -> None:
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "scheduler": ["diffusers", sched], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"] if vae else [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))


def build_tiny_pixel_model(root: Path, critics: str = "embedded") -> Path:
    """``critics``: "embedded" (copy the embedded model's trained critics, so attacks have real targets),
    "random" (random-weight critics) or "none"."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from adjointdpm.embedded import critics as C

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    _text(root, 16)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  prediction_type="sample").save_pretrained(root / "scheduler")  # sane images from random weights
    _index(root, "DDPMScheduler", vae=False)
    from adjointdpm.embedded.data import TEMPLATES, WORDS

    settings = {"default_guidance_scale": 2.0, "default_steps": 4, "default_solver": "ddim", "timesteps": "uniform",
                "words": list(WORDS),
                "caption_templates": list(TEMPLATES), "in_vocabulary_digits": list(range(8)),
                "held_out_vocabulary_digits": [8, 9], "generic_caption": "a handwritten digit"}
    (root / "adjointdpm.json").write_text(json.dumps(settings))
    if critics == "embedded":
        import shutil

        from adjointdpm.components import EMBEDDED_MODEL

        shutil.copytree(EMBEDDED_MODEL / "critics", root / "critics")
    elif critics == "random":
        torch.manual_seed(2)
        guide, judge, emb = C.GuideNet(width=8, hidden=16), C.JudgeNet(width=8, feat=16), C.EmbedNet(width=4, dim=8)
        concepts = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
        safety = C.SafetyFilter(emb, concepts, torch.full((2,), -0.2), concept="digit 7 (seven)")
        feats = torch.randn(64, 16)
        mu, sigma = feats.mean(0), torch.cov(feats.T)
        C.save_critics(root / "critics", guide, judge, safety, mu, sigma, {"flagged_digit": 7, "metrics": {}})
    return root


def build_tiny_latent_model(root: Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    _text(root, 16, max_length=12)
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  skip_prk_steps=True).save_pretrained(root / "scheduler")
    _index(root, "PNDMScheduler", vae=True)
    return root
