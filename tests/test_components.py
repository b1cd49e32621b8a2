"""The one loader: the embedded digits model and a (tiny, random) local Stable Diffusion folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from adjointdpm.components import EMBEDDED_MODEL, ComponentsError, DiffusionComponents, load_components
from adjointdpm.embedded.critics import load_critics

from _tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def embedded():
    return load_components()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def test_embedded_is_the_default_and_pixel_space(embedded):
    assert isinstance(embedded, DiffusionComponents)
    assert embedded.path == EMBEDDED_MODEL and embedded.is_embedded
    assert embedded.vae is None
    assert embedded.latent_shape == (1, 16, 16)
    assert embedded.prediction_type == "epsilon"
    assert embedded.alphas_cumprod.shape == (1000,)
    assert torch.all(embedded.alphas_cumprod[1:] < embedded.alphas_cumprod[:-1])
    assert not embedded.unet.training and not embedded.text_encoder.training
    assert all(not p.requires_grad for p in embedded.unet.parameters())
    assert 1.0 < embedded.settings["default_guidance_scale"] <= 10.0
    x = torch.randn(2, 1, 16, 16)
    assert embedded.decode(x) is x


def test_encode_prompt_is_differentiable_wrt_token_embeddings(embedded):
    te = embedded.text_encoder
    emb = te.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        h = embedded.encode_prompt(["a handwritten digit seven", "the number two"])
        assert h.shape == (2, embedded.tokenizer.model_max_length, te.config.hidden_size)
        assert embedded.unet.config.cross_attention_dim == h.shape[-1]
        h.square().sum().backward()
        tok = embedded.tokenizer
        seven, nine = tok.convert_tokens_to_ids(["seven</w>", "nine</w>"])
        assert emb.grad[seven].abs().sum() > 0  # used token gets a gradient
        assert emb.grad[nine].abs().sum() == 0  # unused one does not
    finally:
        emb.requires_grad_(False)
        emb.grad = None


def test_held_out_words_are_single_tokens(embedded):
    tok = embedded.tokenizer
    for word in ("eight", "nine", "seven", "handwritten", "digit"):
        assert tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids) == [word + "</w>"]
    ids = tok("a handwritten digit nine").input_ids
    assert tok.unk_token_id not in ids[1:-1]


def test_embedded_generate_is_seeded(embedded):
    a = embedded.generate(["a handwritten digit three"] * 2, seed=5, steps=4)
    b = embedded.generate(["a handwritten digit three"] * 2, seed=5, steps=4, batch_size=1)
    c = embedded.generate(["a handwritten digit three"] * 2, seed=6, steps=4)
    assert a.shape == (2, 1, 16, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # batch size changes float rounding only
    assert (a - c).abs().max() > 0.1


def test_sd_folder_loads_with_vae(sd_folder):
    comps = load_components(sd_folder)
    assert comps.vae is not None and not comps.is_embedded
    assert comps.latent_shape == (4, 8, 8)
    assert comps.prediction_type == "epsilon"
    assert type(comps.scheduler).__name__ == "PNDMScheduler"
    assert comps.settings["default_guidance_scale"] == 7.5  # no adjointdpm.json: SD defaults
    h = comps.encode_prompt(["a small digit", ""])
    assert h.shape == (2, 12, 16)
    z = torch.randn(2, *comps.latent_shape)
    img = comps.decode(z)
    assert img.shape == (2, 3, 16, 16)
    torch.testing.assert_close(img, comps.vae.decode(z / comps.vae.config.scaling_factor).sample)
    # decode is differentiable with respect to the latents
    z.requires_grad_(True)
    comps.decode(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    out = comps.generate(["a small digit", "the digit one"], seed=0, steps=2, guidance_scale=3.0)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_sd_folder_v_prediction_and_fp16_variant(tmp_path):
    root = build_tiny_sd(tmp_path / "sd", prediction_type="v_prediction", unet_variant="fp16")
    assert not (root / "unet" / "diffusion_pytorch_model.safetensors").exists()
    comps = load_components(root, dtype=torch.float64)
    assert comps.prediction_type == "v_prediction"
    assert comps.dtype == torch.float64 and comps.text_encoder.dtype == torch.float64


def test_missing_or_invalid_folders_raise_clear_errors(tmp_path, sd_folder):
    with pytest.raises(ComponentsError, match="does not exist"):
        load_components(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ComponentsError, match="not a folder"):
        load_components(tmp_path / "file.txt")
    with pytest.raises(ComponentsError, match="model_index.json"):
        load_components(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ComponentsError, match="text_encoder/"):
        load_components(broken)
    shutil.copytree(sd_folder / "text_encoder", broken / "text_encoder")
    st = broken / "unet" / "diffusion_pytorch_model.safetensors"
    st.rename(broken / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ComponentsError, match=r"no diffusion_pytorch_model.safetensors.*pickle"):
        load_components(broken)
    (broken / "unet" / "diffusion_pytorch_model.bin").rename(st)
    index = json.loads((broken / "model_index.json").read_text())
    del index["scheduler"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ComponentsError, match="lists no scheduler"):
        load_components(broken)
    with pytest.raises(ComponentsError, match="critics"):
        load_critics(sd_folder)


def test_load_critics_embedded():
    critics = load_critics()
    assert critics.safety.concept.startswith("digit")
    assert all(not p.requires_grad for p in critics.parameters())
    x = torch.zeros(3, 1, 16, 16, requires_grad=True)
    critics.guide(x)[:, 3].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
