"""``hpsv2:`` reward. Always: folder errors come before open_clip is needed, and without open_clip the error
names the optional extra. With open_clip_torch importable (the extra ``adjointdpm[hps]``): on a tiny
open_clip folder the score is open_clip's own cosine of image and text features, the torch preprocessing
equals open_clip's eval transform, and the gradient reaches the pixels."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from adjointdpm.critics.errors import CriticError
from adjointdpm.rewards import load_rewards


def _open_clip():
    try:
        import open_clip
    except Exception as e:  # noqa: BLE001 - missing, or a torchvision that does not match the torch build
        pytest.skip(f"open_clip_torch (the optional extra adjointdpm[hps]) is not importable here: {type(e).__name__}")
    return open_clip


def test_folder_errors_without_open_clip(tmp_path):
    with pytest.raises(CriticError, match="is not a folder"):
        load_rewards(f"hpsv2:{tmp_path / 'none'}")
    (tmp_path / "a").mkdir()
    with pytest.raises(CriticError, match="has no open_clip_config.json: convert the HPS checkpoint"):
        load_rewards(f"hpsv2:{tmp_path / 'a'}")
    (tmp_path / "a" / "open_clip_config.json").write_text("{}")
    (tmp_path / "a" / "HPS_v2.1_compressed.pt").write_bytes(b"")
    with pytest.raises(CriticError, match=r"no \.safetensors weights; found only HPS_v2.1_compressed.pt"):
        load_rewards(f"hpsv2:{tmp_path / 'a'}")


def test_missing_extra_is_named(tmp_path, monkeypatch):
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(CriticError, match=r"needs open_clip_torch, the optional extra: pip install 'adjointdpm\[hps\]'"):
        load_rewards(f"hpsv2:{folder}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    _open_clip()
    from _tiny_rewards import build_hps

    return build_hps(tmp_path_factory.mktemp("rewards") / "hps")


def test_score_is_open_clips_cosine(folder):
    open_clip = _open_clip()
    reward = load_rewards(f"hpsv2:{folder}").rewards[0]
    model, _, preprocess_val = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    prompts = ["a cat", "a photo of a dog"]
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(2, 16, 20, 3), dtype=np.uint8)  # 16 x 20: no resize, a centre crop
    from PIL import Image

    theirs = torch.stack([preprocess_val(Image.fromarray(a)) for a in arr])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        torch.testing.assert_close(reward.preprocess(x), theirs, rtol=1e-5, atol=1e-5)
        out = model(image=theirs, text=tokenizer(prompts))
        expected = (out["image_features"] * out["text_features"]).sum(-1) if isinstance(out, dict) else \
            (out[0] * out[1]).sum(-1)
        torch.testing.assert_close(reward(x, prompts), expected, rtol=1e-5, atol=1e-5)
        assert reward.features(x).shape == (2, 8)
    json.dumps(reward.describe())


def test_gradient_reaches_the_pixels(folder):
    x = (torch.rand(2, 3, 24, 20) * 2 - 1).requires_grad_(True)
    load_rewards(f"hpsv2:{folder}")(x, ["a", "b"]).sum().backward()
    assert (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_converter_round_trip(folder, tmp_path):
    from safetensors.torch import load_file

    from adjointdpm.rewards.convert_hps import main

    state = {f"module.{k}": v for k, v in load_file(str(folder / "open_clip_model.safetensors")).items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "HPS_tiny.pt")
    assert main([str(tmp_path / "HPS_tiny.pt"), str(tmp_path / "out"), "--arch", "ViT-H-14"]) == 0
    written = load_file(str(tmp_path / "out" / "open_clip_model.safetensors"))
    assert set(written) == {k.removeprefix("module.") for k in state}
    cfg = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["width"] == 1280 and cfg["preprocess_cfg"]["size"] == 224
