"""``clip:`` and ``pickscore:`` rewards on a tiny random CLIPModel folder: the scores are CLIPModel's own
cos / logit_scale·cos of each image to its prompt, the gradient reaches the pixels (non-zero), and in float64
it equals central finite differences of the reward w.r.t. the pixels."""
from __future__ import annotations

import json

import pytest
import torch

from _tiny_critics import build_clip
from adjointdpm.rewards import load_rewards
from adjointdpm.rewards.clip import ClipReward, PickScoreReward

PROMPTS = ["a cat", "a black dog", "a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_clip(tmp_path_factory.mktemp("rewards") / "clip")


def _images(b=3, h=20, w=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g, dtype=dtype) * 2 - 1)


def _clip_model_logits(reward, images):
    """diag of CLIPModel.forward's logits_per_image = exp(logit_scale) · cos, on the same pixel values."""
    clip = reward.clip
    tok = clip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=clip.tokenizer.model_max_length,
                         return_tensors="pt")
    out = clip.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                     pixel_values=clip.preprocess(images))
    return out.logits_per_image.diagonal()


def test_scores_are_clip_models_own(folder):
    x = _images()
    clip_r = load_rewards(f"clip:{folder}").rewards[0]
    pick_r = load_rewards(f"pickscore:{folder}").rewards[0]
    assert isinstance(clip_r, ClipReward) and isinstance(pick_r, PickScoreReward)
    with torch.no_grad():
        logits = _clip_model_logits(clip_r, x)
        scale = clip_r.clip.model.logit_scale.exp()
        torch.testing.assert_close(pick_r(x, PROMPTS), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clip_r(x, PROMPTS), logits / scale, rtol=1e-5, atol=1e-6)
        assert clip_r(x, PROMPTS).abs().max() <= 1
        assert clip_r.features(x).shape == (3, 8)
        torch.testing.assert_close(clip_r.features(x).norm(dim=-1), torch.ones(3))
    d = pick_r.describe()
    json.dumps(d)
    assert d["kind"] == "pickscore" and d["logit_scale_exp"] == pytest.approx(float(scale))


def test_gradient_reaches_the_pixels(folder):
    for kind in ("clip", "pickscore"):
        x = _images().requires_grad_(True)
        load_rewards(f"{kind}:{folder}")(x, PROMPTS).sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_float64_gradient_equals_finite_differences(folder):
    reward = load_rewards(f"clip:{folder}").double()
    x = _images(dtype=torch.float64).requires_grad_(True)
    r = reward(x, PROMPTS)
    assert r.dtype == torch.float64
    (grad,) = torch.autograd.grad(r.sum(), x)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        fd = (reward(x + eps * v, PROMPTS).sum() - reward(x - eps * v, PROMPTS).sum()) / (2 * eps)
    analytic = (grad * v).sum()
    assert abs(float(analytic)) > 1e-4
    assert float((fd - analytic).abs()) <= 1e-8 * max(1.0, float(analytic.abs()))
