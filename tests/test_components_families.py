"""load_components on SDXL, SD3, Flux and PixArt folders, checked against each family's diffusers pipeline.

Every tiny folder (tests/_tiny_families.py) is opened twice: by ``load_components`` and by the
pipeline class itself (``<Pipeline>.from_pretrained(folder, local_files_only=True)``). Then
``encode_prompt`` / ``negative_cond`` equal the pipeline's ``encode_prompt`` (and its size ids, image
ids, guidance), ``noise`` equals ``prepare_latents`` with the same seeded generator, ``decode`` equals
the pipeline's own VAE step (its ``output_type="latent"`` result decoded vs its ``output_type="pt"``
images), ``scheduler_timesteps`` equals the grid the pipeline set, and ``generate`` equals the
pipeline run from the same ``latents=`` (float64; tolerance 1e-5, the engine's forward bar).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from adjointdpm.components import ComponentsError, load_components

from _tiny_families import build_tiny_flux, build_tiny_pixart, build_tiny_sd3, build_tiny_sdxl

PROMPTS = ["a small digit", "the number two in bold"]
SIZE = dict(height=16, width=16)
EXACT = dict(rtol=0, atol=0)
FORWARD = dict(rtol=1e-5, atol=1e-6)  # generate vs the pipeline's loop, float64

BUILD = {
    "sdxl": build_tiny_sdxl,
    "sdxl-nozeros": lambda root: build_tiny_sdxl(root, force_zeros_for_empty_prompt=False),
    "sd3": build_tiny_sd3,
    "sd3-no-t5-dynamic": lambda root: build_tiny_sd3(root, with_t5=False, dynamic_shift=True),
    "flux": build_tiny_flux,
    "flux-no-guidance-embeds": lambda root: build_tiny_flux(root, guidance_embeds=False),
    "pixart-sigma": build_tiny_pixart,
    "pixart-alpha": lambda root: build_tiny_pixart(root, sigma=False),
}
FAMILY = {"sdxl": "sdxl", "sdxl-nozeros": "sdxl", "sd3": "sd3", "sd3-no-t5-dynamic": "sd3", "flux": "flux",
          "flux-no-guidance-embeds": "flux", "pixart-sigma": "pixart", "pixart-alpha": "pixart"}


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILD.items()}


def _pipeline(folder, dtype=torch.float32):
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    name = index["_class_name"]
    extra = {"add_watermarker": False} if "XL" in name else {}
    if index.get("text_encoder_3") == [None, None]:
        extra.update(text_encoder_3=None, tokenizer_3=None)  # SD3 without T5, as diffusers documents it
    pipe = getattr(diffusers, name).from_pretrained(folder, local_files_only=True, dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():  # frozen, as load_components returns them (autograd picks other kernels)
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    return pipe


def _pipe_kwargs(kind: str) -> dict:
    if kind.startswith("pixart"):
        return dict(use_resolution_binning=False, clean_caption=False, **SIZE)
    return dict(SIZE)


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", list(BUILD))
def test_folder_opens_as_its_family(folders, kind):
    comps = load_components(folders[kind])
    assert comps.family == FAMILY[kind]
    net = comps.network
    if comps.family == "sdxl":
        assert comps.unet is net and comps.transformer is None
        assert type(comps.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    else:
        assert comps.unet is None and comps.transformer is net
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    assert comps.vae is not None and not comps.is_embedded
    assert set(comps.settings) >= {"default_guidance_scale", "default_steps", "default_solver"}
    if comps.family in ("sd3", "flux"):
        assert comps.settings["default_solver"] == "ddim"  # FlowMatchEuler's Euler step
        assert comps.prediction_type == "flow_prediction"


# ---------------------------------------------------------------------- text
@pytest.mark.parametrize("kind", ["sdxl", "sdxl-nozeros"])
def test_sdxl_cond_equals_pipeline(folders, kind):
    comps, pipe = load_components(folders[kind]), _pipeline(folders[kind])
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond, neg = comps.encode_prompt(PROMPTS), comps.negative_cond(len(PROMPTS))
    torch.testing.assert_close(cond["encoder_hidden_states"], pe, **EXACT)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, **EXACT)
    torch.testing.assert_close(neg["encoder_hidden_states"], npe, **EXACT)
    torch.testing.assert_close(neg["added_cond_kwargs"]["text_embeds"], npooled, **EXACT)
    assert (neg["encoder_hidden_states"].abs().max() == 0) == (kind == "sdxl")  # force_zeros_for_empty_prompt
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    for c in (cond, neg):
        torch.testing.assert_close(c["added_cond_kwargs"]["time_ids"], ids.repeat(len(PROMPTS), 1), **EXACT)
    assert pe.shape[-1] == comps.unet.config.cross_attention_dim


@pytest.mark.parametrize("kind", ["sd3", "sd3-no-t5-dynamic"])
def test_sd3_cond_equals_pipeline(folders, kind):
    comps, pipe = load_components(folders[kind]), _pipeline(folders[kind])
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True)
    cond, neg = comps.encode_prompt(PROMPTS), comps.negative_cond(len(PROMPTS))
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    torch.testing.assert_close(cond["encoder_hidden_states"], pe, **EXACT)
    torch.testing.assert_close(cond["pooled_projections"], pooled, **EXACT)
    torch.testing.assert_close(neg["encoder_hidden_states"], npe, **EXACT)
    torch.testing.assert_close(neg["pooled_projections"], npooled, **EXACT)
    assert pe.shape[1] == 12 + 256  # CLIP tokens, then T5's (zeros without a text_encoder_3)
    assert (pe[:, 12:].abs().max() == 0) == (kind != "sd3")


@pytest.mark.parametrize("kind", ["flux", "flux-no-guidance-embeds"])
def test_flux_cond_equals_pipeline(folders, kind):
    comps, pipe = load_components(folders[kind]), _pipeline(folders[kind])
    pe, pooled, txt_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
    npe, npooled, _ = pipe.encode_prompt([""] * len(PROMPTS), None, device="cpu")
    cond, neg = comps.encode_prompt(PROMPTS, guidance_scale=2.5), comps.negative_cond(len(PROMPTS))
    torch.testing.assert_close(cond["encoder_hidden_states"], pe, **EXACT)
    torch.testing.assert_close(cond["pooled_projections"], pooled, **EXACT)
    torch.testing.assert_close(cond["txt_ids"], txt_ids, **EXACT)
    img_ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", pe.dtype)  # 8x8 latent -> 4x4 tokens
    torch.testing.assert_close(cond["img_ids"], img_ids, **EXACT)
    assert set(neg) == {"encoder_hidden_states", "pooled_projections"}  # ids and guidance are shared
    torch.testing.assert_close(neg["encoder_hidden_states"], npe, **EXACT)
    torch.testing.assert_close(neg["pooled_projections"], npooled, **EXACT)
    if kind == "flux":
        torch.testing.assert_close(cond["guidance"], torch.full((2,), 2.5))
        assert cond["guidance"].dtype == torch.float32
        assert comps.encode_prompt("x")["guidance"].item() == comps.settings["default_guidance_scale"] == 3.5
    else:
        assert "guidance" not in cond and comps.settings["default_guidance_scale"] == 1.0


@pytest.mark.parametrize("kind", ["pixart-sigma", "pixart-alpha"])
def test_pixart_cond_equals_pipeline(folders, kind):
    comps, pipe = load_components(folders[kind]), _pipeline(folders[kind])
    prompts = ["A Small Digit  ", "the number two"]  # the pipelines lower-case and strip
    pe, mask, npe, nmask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                              device="cpu", clean_caption=False)
    cond, neg = comps.encode_prompt(prompts), comps.negative_cond(len(prompts))
    assert pe.shape[1] == (300 if kind == "pixart-sigma" else 120)
    torch.testing.assert_close(cond["encoder_hidden_states"], pe, **EXACT)
    torch.testing.assert_close(cond["encoder_attention_mask"], mask, **EXACT)
    torch.testing.assert_close(neg["encoder_hidden_states"], npe, **EXACT)
    torch.testing.assert_close(neg["encoder_attention_mask"], nmask, **EXACT)
    assert cond["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    assert 0 < mask.sum(1).max() < mask.shape[1]  # a real mask: some tokens, then padding


def test_encode_prompt_is_differentiable_wrt_every_text_encoder(folders):
    comps = load_components(folders["sd3"])
    encoders = [comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3]
    tables = [e.get_input_embeddings().weight for e in encoders]
    for t in tables:
        t.requires_grad_(True)
    cond = comps.encode_prompt(["a small digit"])
    (cond["encoder_hidden_states"].square().sum() + cond["pooled_projections"].square().sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables)


# ---------------------------------------------------------------------- latents, images, time grid
@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux", "pixart-sigma"])
def test_noise_is_the_pipelines_latents(folders, kind):
    comps, pipe = load_components(folders[kind]), _pipeline(folders[kind])
    g = torch.Generator().manual_seed(7)
    if comps.family == "flux":
        ref, _ = pipe.prepare_latents(3, 4, 16, 16, torch.float32, "cpu", g)
        assert comps.latent_shape == (16, 16) == tuple(ref.shape[1:])  # (4x4 tokens, 4 channels x 2x2)
    else:
        ref = pipe.prepare_latents(3, 4, 16, 16, torch.float32, "cpu", g)
        if comps.family != "sd3":
            ref = ref / pipe.scheduler.init_noise_sigma  # the pipeline scales unit noise; x_T is the unit noise
    torch.testing.assert_close(comps.noise(3, 7), ref, rtol=1e-6, atol=0)
    assert not torch.equal(comps.noise(3, 7), comps.noise(3, 8))


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "sd3-no-t5-dynamic", "flux", "pixart-sigma", "pixart-alpha"])
def test_decode_and_time_grid_equal_the_pipelines(folders, kind):
    comps, pipe = load_components(folders[kind]), _pipeline(folders[kind])
    x_T = comps.noise(1, 3)
    kw = dict(latents=x_T, num_inference_steps=3, guidance_scale=1.0, **_pipe_kwargs(kind))
    latents = pipe("a small digit", output_type="latent", **kw).images
    images = pipe("a small digit", output_type="pt", **kw).images
    torch.testing.assert_close(pipe.scheduler.timesteps, comps.scheduler_timesteps(3), **EXACT)
    if hasattr(pipe.scheduler, "sigmas"):
        torch.testing.assert_close(pipe.scheduler.sigmas, comps.scheduler.sigmas, **EXACT)
    mine = comps.decode(latents)
    assert mine.shape == (1, 3, 16, 16)
    torch.testing.assert_close((mine / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=1e-6)
    z = latents.clone().requires_grad_(True)
    comps.decode(z).sum().backward()
    assert z.grad.abs().sum() > 0


def test_flux_pack_unpack_round_trip_and_bad_tokens(folders):
    from adjointdpm.families.flux import pack, unpack

    x = torch.randn(2, 4, 8, 6)
    assert pack(x).shape == (2, 12, 16)
    torch.testing.assert_close(unpack(pack(x), 8, 6), x, **EXACT)
    comps = load_components(folders["flux"])
    with pytest.raises(ValueError, match="do not pack"):
        comps.decode(torch.randn(1, 4, 8, 8))  # unpacked latents handed to Flux's decode


# ---------------------------------------------------------------------- errors
def _copy(folders, kind, tmp_path):
    dst = tmp_path / kind
    shutil.copytree(folders[kind], dst)
    return dst


def _edit_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    for k, v in changes.items():
        if v is None:
            index.pop(k, None)
        else:
            index[k] = v
    (folder / "model_index.json").write_text(json.dumps(index))


def test_unknown_pipeline_class_is_one_clear_line(folders, tmp_path):
    root = _copy(folders, "sd3", tmp_path)
    _edit_index(root, _class_name="KandinskyV22Pipeline")
    with pytest.raises(ComponentsError, match=r"KandinskyV22Pipeline, which is not supported; supported pipelines: .*FluxPipeline") as e:
        load_components(root)
    assert "\n" not in str(e.value)


def test_missing_second_text_encoder(folders, tmp_path):
    root = _copy(folders, "sdxl", tmp_path)
    shutil.rmtree(root / "text_encoder_2")
    with pytest.raises(ComponentsError, match=r"has no text_encoder_2/ folder"):
        load_components(root)
    _edit_index(root, text_encoder_2=[None, None])
    with pytest.raises(ComponentsError, match=r"lists no text_encoder_2"):
        load_components(root)
    _edit_index(root, _class_name="StableDiffusionPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(ComponentsError, match=r"two text encoders.*StableDiffusionXLPipeline"):
        load_components(root)


def test_pickle_only_transformer_and_t5_are_refused(folders, tmp_path):
    root = _copy(folders, "flux", tmp_path)
    st = root / "transformer" / "diffusion_pytorch_model.safetensors"
    st.rename(root / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ComponentsError, match=r"transformer has no diffusion_pytorch_model.safetensors.*pickle"):
        load_components(root)
    (root / "transformer" / "diffusion_pytorch_model.bin").rename(st)
    (root / "text_encoder_2" / "model.safetensors").rename(root / "text_encoder_2" / "pytorch_model.bin")
    with pytest.raises(ComponentsError, match=r"text_encoder_2 has no model.safetensors.*pickle"):
        load_components(root)


def test_unknown_component_class_is_named(folders, tmp_path):
    root = _copy(folders, "pixart-sigma", tmp_path)
    _edit_index(root, transformer=["diffusers", "NoSuchTransformer"])
    with pytest.raises(ComponentsError, match=r"diffusers.NoSuchTransformer for transformer"):
        load_components(root)


# ---------------------------------------------------------------------- end to end (the engine)
GENERATE = [
    ("sdxl", dict(guidance_scale=5.0), dict(guidance_scale=5.0)),
    ("sdxl-nozeros", dict(guidance_scale=3.0), dict(guidance_scale=3.0)),
    ("sd3", dict(guidance_scale=4.0), dict(guidance_scale=4.0)),
    ("sd3-no-t5-dynamic", dict(guidance_scale=1.0), dict(guidance_scale=1.0)),
    ("flux", dict(guidance_scale=3.5), dict(guidance_scale=3.5)),  # guidance-distilled: no CFG
    ("flux", dict(guidance_scale=3.5, true_cfg_scale=2.0), dict(guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt="")),
    ("flux-no-guidance-embeds", dict(guidance_scale=4.0), dict(true_cfg_scale=4.0, negative_prompt="")),
    ("pixart-sigma", dict(guidance_scale=4.5), dict(guidance_scale=4.5)),
    ("pixart-alpha", dict(guidance_scale=4.5), dict(guidance_scale=4.5)),
]


@pytest.mark.parametrize("kind, mine, theirs", GENERATE, ids=[f"{k}-{'-'.join(map(str, m.values()))}" for k, m, _ in GENERATE])
def test_generate_equals_the_pipeline(folders, kind, mine, theirs):
    comps = load_components(folders[kind], dtype=torch.float64)
    pipe = _pipeline(folders[kind], dtype=torch.float64)
    x_T = comps.noise(2, 11)
    kw = dict(latents=x_T, num_inference_steps=3, **theirs, **_pipe_kwargs(kind))
    ref_x0 = pipe(PROMPTS, output_type="latent", **kw).images
    ref = pipe(PROMPTS, output_type="pt", **kw).images
    x0 = comps.generate(PROMPTS, x_T=x_T, steps=3, decode=False, **mine)
    images = comps.generate(PROMPTS, x_T=x_T, steps=3, **mine)
    assert x0.shape == ref_x0.shape == x_T.shape and images.shape == ref.shape == (2, 3, 16, 16)
    assert (x0 - x_T).abs().max() > 0.1  # sampling moved the latents
    torch.testing.assert_close(x0, ref_x0, **FORWARD)
    torch.testing.assert_close((images.double() / 2 + 0.5).clamp(0, 1), ref.double(), **FORWARD)
    assert ((ref > 0) & (ref < 1)).float().mean() > 0.5  # most pixels are not clamped: the comparison bites


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux", "pixart-sigma"])
def test_cli_sample_writes_images_for_each_family(folders, kind, tmp_path):
    import numpy as np
    from PIL import Image

    from adjointdpm.cli import run

    out = tmp_path / "out"
    rc = run(["sample", "-p", "a small digit", "-n", "2", "-o", str(out), "--model", str(folders[kind]),
              "--steps", "2", "--threads", "1"])
    assert rc == 0
    files = sorted(out.glob("[0-9]*.png"))
    assert [f.name for f in files] == ["000.png", "001.png"]
    assert all(np.asarray(Image.open(f)).shape == (16, 16, 3) for f in files)
    meta = json.loads((out / "sample.json").read_text())
    assert meta["steps"] == 2 and meta["model"] == str(folders[kind])


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux", "pixart-sigma"])
def test_cli_sample_with_each_stochastic_solver(folders, kind, tmp_path, capsys):
    """Every stochastic solver samples each family on its folder's own scheduler grid (PixArt's
    DPM-Solver config has variance_type=None: DDPM's fixed_small), except Euler ancestral on a flow grid
    from σ = 1, which says what to use instead."""
    import numpy as np
    from PIL import Image

    from adjointdpm.cli import run

    flow = kind in ("sd3", "flux")
    for solver in (["ddpm"], ["euler_ancestral"], ["dpmpp2m_sde"], ["lcm"], ["ddim", "--eta", "1"]):
        out = tmp_path / solver[0]
        rc = run(["sample", "-p", "a small digit", "-n", "2", "-o", str(out), "--model", str(folders[kind]),
                  "--steps", "2", "--threads", "1", "--solver", *solver])
        err = capsys.readouterr().err
        if flow and solver == ["euler_ancestral"]:
            assert rc == 2 and "infinite where α = 0" in err and err.count("\n") == 1
            continue
        assert rc == 0, err
        images = [np.asarray(Image.open(f)) for f in sorted(out.glob("[0-9]*.png"))]
        assert len(images) == 2 and all(im.shape == (16, 16, 3) for im in images)


def test_python_m_adjointdpm_sample_on_a_flux_folder(folders, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "flux_out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "adjointdpm", "sample", "-p", "a small digit", "-n", "1", "-o", str(out),
                           "--model", str(folders["flux"]), "--steps", "2", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "000.png").is_file() and (out / "grid.png").is_file()
    assert json.loads((out / "sample.json").read_text())["guidance_scale"] == 3.5  # the guidance-distilled default
