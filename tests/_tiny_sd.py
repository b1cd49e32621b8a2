"""Builds a tiny random-weight Stable-Diffusion-layout diffusers folder (latent UNet, VAE, CLIP) for tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def build_tiny_sd(root: Path, prediction_type: str = "epsilon", unet_variant: str | None = None) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adjointdpm.embedded.text import BOS, EOS, vocab_and_merges, write_tokenizer

    root = Path(root)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    write_tokenizer(root / "tokenizer")
    cfg = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 12
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
    vocab, _ = vocab_and_merges()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=12,
                                      bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    sched = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          prediction_type=prediction_type, skip_prk_steps=True)
    unet.save_pretrained(root / "unet", safe_serialization=True, variant=unet_variant)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    te.save_pretrained(root / "text_encoder", safe_serialization=True)
    sched.save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root
