"""Precision and memory controls of load_components on tiny folders of every family, on the CPU.

* ``dtype="bf16"``: every weight is bfloat16, and images are close to float32's: max |Δ| ≤ 0.1 and
  mean |Δ| ≤ 0.02 on [-1, 1] images (4 steps of random tiny models; measured ≤ 0.05 and ≤ 0.01);
* ``release_encoders``: the text encoders are dropped (their modules freed) and the next
  ``encode_prompt`` re-loads them, giving the same cond; a Session releases them after encoding and its
  gradient still reaches x_T, in float32 and in bfloat16;
* ``offload=True``: encoders' and VAE's parameters are on the meta device outside their calls (their
  weights wait in CPU memory under accelerate's hooks), images and decode gradients are unchanged;
* ``decode`` under a graph checkpoints the VAE decoder's blocks: fewer bytes saved for backward, the same
  gradient (float64);
* ``compile``: the network's forward is compiled in place (backend "eager" here: inductor takes minutes
  on a busy CPU for the tiny UNet) and samples as before.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from adjointdpm.components import ComponentsError, load_components, resolve_dtype

from _tiny_families import BUILDERS
from _tiny_sd import build_tiny_sd

PROMPTS = ["a small digit", "the number two"]
FAMILIES = ["sd", "sdxl", "sd3", "flux", "pixart"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return {"sd": build_tiny_sd(root / "sd"), **{k: b(root / k) for k, b in BUILDERS.items()}}


def modules(comps) -> dict[str, torch.nn.Module]:
    names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    return {n: getattr(comps, n) for n in names if getattr(comps, n) is not None}


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype(torch.float64) is torch.float64
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype(None, "cuda:0") is torch.bfloat16
    with pytest.raises(ComponentsError, match="unknown dtype 'int8': use bf16, fp16 or fp32"):
        resolve_dtype("int8")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_weights_and_images_close_to_fp32(folders, family):
    full = load_components(folders[family])
    half = load_components(folders[family], dtype="bf16")
    for name, m in modules(half).items():
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}, name
    assert half.noise(1, 0).dtype == torch.bfloat16
    a = full.generate(PROMPTS, seed=0, steps=4)
    b = half.generate(PROMPTS, seed=0, steps=4)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    diff = (a - b).abs()
    assert diff.max() <= 0.1 and diff.mean() <= 0.02, (diff.max().item(), diff.mean().item())
    assert (a - b).abs().max() > 0  # (it did run in another precision)


def test_fp16_keeps_an_upcast_vae_in_float32(folders):
    comps = load_components(folders["sdxl"], dtype="fp16")
    assert comps.dtype == torch.float16 and comps.text_encoder_2.dtype == torch.float16
    assert comps.vae.dtype == torch.float32 and comps.vae.config.force_upcast


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_released_encoders_are_freed_and_come_back(folders, family):
    comps = load_components(folders[family])
    before = comps.encode_prompt(PROMPTS)
    refs = [weakref.ref(m) for m in comps.text_encoders.values()]
    released = comps.release_encoders()
    assert set(released) >= {"text_encoder", "text_encoder_2"} and comps.text_encoders == {}
    gc.collect()
    assert all(r() is None for r in refs)  # no reference is left: the weights are freed
    after = comps.encode_prompt(PROMPTS)
    assert set(comps.text_encoders) == set(released) and comps.released == {}
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    kept = dict(comps.text_encoders)
    assert comps.release_encoders("cpu") == list(kept)  # (to CPU memory: the same modules, moved back on use)
    assert comps.released == {n: "cpu" for n in kept} and comps.text_encoders == kept
    comps.encode_prompt(PROMPTS)
    assert comps.released == {} and all(comps.text_encoders[n] is m for n, m in kept.items())
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'free'"):
        comps.release_encoders("gpu")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_session_releases_encoders_and_the_gradient_flows(folders, dtype):
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    s = Session(EngineOptions(model=folders["sd"], dtype=dtype, steps=3, grad="exact"))
    expected = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert s.comps.dtype == expected and s.comps.text_encoder.dtype == expected
    cond = s.encode(["a small digit"])
    assert s.comps.text_encoders == {} and s.comps.released == {"text_encoder": "free"}
    x = s.noise(1, 0).requires_grad_()
    loss, per, _ = s.sampled_loss(x, cond, lambda x0: s.decode(x0).square().mean(dim=(1, 2, 3)))
    loss.backward()
    assert x.grad.dtype == expected and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    again = s.encode(["the number two"])  # brought back, then released again
    assert again.shape == cond.shape and s.comps.text_encoders == {}


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_offloaded_parts_wait_off_the_device(folders, family):
    plain = load_components(folders[family])
    off = load_components(folders[family], offload=True)
    frozen = {n: m for n, m in modules(off).items() if n not in ("unet", "transformer")}
    assert "vae" in frozen and "text_encoder" in frozen
    for name, m in frozen.items():
        assert {p.device.type for p in m.parameters()} == {"meta"}, name
    assert off.network.device.type == "cpu"
    torch.testing.assert_close(off.generate(PROMPTS, seed=0, steps=3), plain.generate(PROMPTS, seed=0, steps=3),
                               rtol=0, atol=0)
    x0 = plain.noise(1, 3)
    grads = []
    for comps in (plain, off):
        x = x0.clone().requires_grad_()
        comps.decode(x).square().sum().backward()  # checkpointed blocks re-run under the offload hooks
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    for name, m in frozen.items():
        assert {p.device.type for p in m.parameters()} == {"meta"}, name
    off.release_encoders()
    assert off.text_encoders == {}
    off.encode_prompt(PROMPTS)  # re-loaded under the hooks again
    assert all({p.device.type for p in m.parameters()} == {"meta"} for m in off.text_encoders.values())


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_decode_is_checkpointed_under_a_graph(folders):
    comps = load_components(folders["sd"], dtype=torch.float64)
    x0 = comps.noise(1, 0)
    results = {}
    for checkpoint in (True, False):
        x = x0.clone().requires_grad_()
        image, saved = _saved_bytes(lambda: comps.decode(x, checkpoint=checkpoint))
        image.square().sum().backward()
        results[checkpoint] = (image.detach(), x.grad, saved)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-12, atol=1e-12)
    assert results[True][2] < 0.5 * results[False][2], (results[True][2], results[False][2])


def test_compile_wraps_the_network_in_place(folders):
    plain = load_components(folders["sd"])
    compiled = load_components(folders["sd"], compile={"backend": "eager"})
    assert type(compiled.network) is type(plain.network)
    assert compiled.network._compiled_call_impl is not None and plain.network._compiled_call_impl is None
    assert list(compiled.network.state_dict()) == list(plain.network.state_dict())
    torch.testing.assert_close(compiled.generate(PROMPTS[:1], seed=0, steps=1, guidance_scale=1.0),
                               plain.generate(PROMPTS[:1], seed=0, steps=1, guidance_scale=1.0), rtol=1e-6, atol=1e-6)


def test_exact_weight_gradients_of_a_bf16_folder(folders):
    """The network loaded in bfloat16: exact's weight gradients are bfloat16 (accumulated over the steps in
    float32, gradients/_vjp.py), finite and close to those of the float32 network."""
    import adjointdpm as adpm

    grads = {}
    for dtype in ("fp32", "bf16"):
        comps = load_components(folders["sd"], dtype=dtype)
        layer = comps.unet.conv_in
        layer.weight.requires_grad_(True)
        setup = comps.family_spec.sampling_setup(comps, 4, 1.0)
        x0 = adpm.sample(comps.unet, comps.noise(2, 0), schedule=setup.schedule, timesteps=setup.timesteps,
                         cond=comps.encode_prompt(PROMPTS), solver="dpmpp2m", grad="exact")
        comps.decode(x0).square().mean().backward()
        grads[dtype] = layer.weight.grad
    assert grads["bf16"].dtype == torch.bfloat16 and torch.isfinite(grads["bf16"]).all()
    rel = ((grads["bf16"].float() - grads["fp32"]).norm() / grads["fp32"].norm()).item()
    assert rel < 0.1, rel


def test_commands_take_dtype_and_offload(folders, tmp_path, capsys):
    import json

    from adjointdpm.cli import run

    loss = tmp_path / "loss.py"
    loss.write_text("def bright(images):\n    return (images - 1).pow(2).mean((1, 2, 3))\n")
    out = tmp_path / "guide"
    code = run(["guide", "--model", str(folders["sd"]), "--out", str(out), "-n", "2", "--iters", "2", "--steps", "3",
                "--loss", f"{loss}:bright", "--prompt", "a photo", "--quiet", "--dtype", "bf16", "--offload"])
    assert code == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file()
    code = run(["sample", "--model", str(folders["sd"]), "-p", "a photo", "-n", "1", "--steps", "2",
                "-o", str(tmp_path / "s"), "--dtype", "bf16"])
    assert code == 0 and json.loads((tmp_path / "s" / "sample.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    code = run(["sample", "-p", "a photo", "-n", "1", "-o", str(tmp_path / "bad"), "--dtype", "int4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown dtype 'int4': use bf16, fp16 or fp32" in err
