"""``aesthetic:`` reward: the converter reads a .pth with the published LAION head's module layout (Linear,
Dropout, …, Linear, Linear under ``layers``) through ``torch.load(weights_only=True)``; the reward equals
that Sequential applied to CLIPModel's L2-normalised image features; gradients reach the pixels; a folder
without the head, a head that does not fit the CLIP embeddings, and a non-tensor .pth are one-line errors."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
import torch.nn.functional as F

from _tiny_critics import build_clip
from _tiny_rewards import aesthetic_head_pth, aesthetic_sequential, build_aesthetic
from adjointdpm.critics.errors import CriticError
from adjointdpm.rewards import load_rewards
from adjointdpm.rewards.aesthetic import HEAD_FILE
from adjointdpm.rewards.convert_aesthetic import convert, main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_aesthetic(tmp_path_factory.mktemp("rewards") / "aesthetic")


def test_reward_is_the_head_on_normalised_clip_features(folder):
    reward = load_rewards(f"aesthetic:{folder}").rewards[0]
    x = torch.rand(3, 3, 20, 18) * 2 - 1
    seq = aesthetic_sequential()  # the same seed as the saved head: the published module, not our loader
    with torch.no_grad():
        feats = reward.vision.get_image_features(pixel_values=reward.preprocess(x))
        feats = getattr(feats, "pooler_output", feats)
        expected = seq(F.normalize(feats, dim=-1)).squeeze(-1)
        torch.testing.assert_close(reward(x, ["p"] * 3), expected)
        torch.testing.assert_close(reward.features(x), F.normalize(feats, dim=-1))
    d = reward.describe()
    json.dumps(d)
    assert d["head_activation"] == "none" and len(d["head_layers"]) == 5


def test_gradient_reaches_the_pixels(folder):
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    load_rewards(f"aesthetic:{folder}")(x, ["a", "b"]).sum().backward()
    assert (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_converter_layout_and_cli(tmp_path):
    pth = aesthetic_head_pth(tmp_path / "head.pth", widths=(12, 7, 6, 5, 4, 1))
    keys = set(torch.load(pth, weights_only=True))
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert main([str(pth), str(tmp_path / "out"), "--activation", "relu"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / HEAD_FILE), framework="pt") as f:
        assert f.metadata()["activation"] == "relu"
        shapes = [tuple(f.get_tensor(f"linear{i}.weight").shape) for i in range(5)]
    assert shapes == [(7, 12), (6, 7), (5, 6), (4, 5), (1, 4)]


def test_bad_heads_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    with open(bad, "wb") as f:
        pickle.dump({"layers.0.weight": object()}, f, protocol=2)
    assert main([str(bad), str(tmp_path / "o")]) == 2
    assert "tensors-only state dict" in capsys.readouterr().err
    two = tmp_path / "two.pth"
    torch.save({"layers.0.weight": torch.zeros(3, 4), "layers.0.bias": torch.zeros(3)}, two)
    with pytest.raises(CriticError, match="gives 3 outputs, not one score"):
        convert(two, tmp_path / "o")
    gap = tmp_path / "gap.pth"
    torch.save({"l.0.weight": torch.zeros(3, 4), "l.0.bias": torch.zeros(3), "l.2.weight": torch.zeros(1, 5),
                "l.2.bias": torch.zeros(1)}, gap)
    with pytest.raises(CriticError, match="layer 1 takes 5 inputs but layer 0 gives 3"):
        convert(gap, tmp_path / "o")


def test_folder_errors(tmp_path, folder):
    clip_only = build_clip(tmp_path / "clip_only")
    with pytest.raises(CriticError, match=f"has no {HEAD_FILE}: convert the published head with python -m"):
        load_rewards(f"aesthetic:{clip_only}")
    wrong = tmp_path / "wrong"
    shutil.copytree(clip_only, wrong)
    convert(aesthetic_head_pth(tmp_path / "h768.pth", widths=(768, 16, 8, 4, 4, 1)), wrong)
    with pytest.raises(CriticError, match="embeddings have 8 dimensions but aesthetic_head.safetensors takes 768"):
        load_rewards(f"aesthetic:{wrong}")


def test_vision_with_projection_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from _tiny_critics import _clip_processor

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4, projection_dim=8)
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path / "vision", safe_serialization=True)
    _clip_processor().save_pretrained(tmp_path / "vision")
    convert(aesthetic_head_pth(tmp_path / "h.pth"), tmp_path / "vision")
    reward = load_rewards(f"aesthetic:{tmp_path / 'vision'}")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        e = F.normalize(model(pixel_values=reward.rewards[0].preprocess(x)).image_embeds, dim=-1)
        torch.testing.assert_close(reward(x, ["a", "b"]), aesthetic_sequential()(e).squeeze(-1))
