"""Shared fixtures: tiny random-weight diffusers models in float64 and Stable-Diffusion-style schedulers."""

from __future__ import annotations

import pytest
import torch

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def tiny_conditional_unet(seed: int = 0, channels: int = 2, width: int = 8) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    return unet.double().eval()


@pytest.fixture(autouse=True)
def _one_thread():
    # Two test workers share two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)


@pytest.fixture
def unet():
    return tiny_conditional_unet()


@pytest.fixture
def inputs():
    """x_T (2, 2, 8, 8), cond (2, 3, 8), uncond (1, 3, 8) and a fixed loss weight, all float64."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=g)
    cond = torch.randn(2, 3, 8, dtype=torch.float64, generator=g)
    uncond = torch.randn(1, 3, 8, dtype=torch.float64, generator=g)
    weight = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=g)
    return x, cond, uncond, weight
