"""Exact gradient modes equal float64 back-propagation, and back-propagation equals finite differences."""

import pytest
import torch
from diffusers import DDIMScheduler

import adjointdpm as adpm
from conftest import SD_BETAS, tiny_conditional_unet

SCHEDULE = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))
TIMESTEPS = [999, 801.5, 600, 350.25, 120, 20]  # fractional times on purpose


def gradients(unet, inputs, grad, solver, guidance_scale=3.0, prediction_type="epsilon"):
    x, cond, uncond, weight = inputs
    unet.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    cond = cond.clone().requires_grad_()
    uncond = uncond.clone().requires_grad_() if guidance_scale != 1 else None
    x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, uncond=uncond,
                     guidance_scale=guidance_scale, solver=solver, grad=grad, prediction_type=prediction_type)
    (x0 * weight).sum().backward()
    weights = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return {"x_T": x.grad, "cond": cond.grad, "uncond": None if uncond is None else uncond.grad, "weights": weights}


def assert_same(got, ref, rtol):
    for key in ("x_T", "cond", "uncond"):
        if ref[key] is None:
            assert got[key] is None
            continue
        err = ((got[key] - ref[key]).norm() / ref[key].norm()).item()
        assert err <= rtol, f"{key}: relative error {err:.2e}"
    assert got["weights"].keys() == ref["weights"].keys()
    flat_got = torch.cat([g.flatten() for g in got["weights"].values()])
    flat_ref = torch.cat([g.flatten() for g in ref["weights"].values()])
    err = ((flat_got - flat_ref).norm() / flat_ref.norm()).item()
    assert err <= rtol, f"weights: relative error {err:.2e}"


@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m", "heun"])
@pytest.mark.parametrize("mode", ["exact", "checkpoint"])
def test_exact_modes_equal_backprop(unet, inputs, solver, mode):
    ref = gradients(unet, inputs, "backprop", solver)
    assert len(ref["weights"]) == len(list(unet.parameters()))
    assert_same(gradients(unet, inputs, mode, solver), ref, rtol=1e-8)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_exact_equals_backprop_other_predictions_no_guidance(unet, inputs, prediction_type):
    ref = gradients(unet, inputs, "backprop", "dpmpp2m", guidance_scale=1.0, prediction_type=prediction_type)
    assert_same(gradients(unet, inputs, "exact", "dpmpp2m", 1.0, prediction_type), ref, rtol=1e-8)


def test_weight_subset_and_existing_grads(unet, inputs):
    """Only parameters with requires_grad are differentiated; gradients add to existing .grad."""
    for name, p in unet.named_parameters():
        p.requires_grad_("up_blocks" in name)
    ref = gradients(unet, inputs, "backprop", "ddim")
    assert ref["weights"] and all("up_blocks" in n for n in ref["weights"])
    got = gradients(unet, inputs, "exact", "ddim")
    assert_same(got, ref, rtol=1e-8)
    # accumulate twice without zeroing: .grad doubles, as with plain autograd
    x, cond, uncond, weight = inputs
    unet.zero_grad(set_to_none=True)
    for _ in range(2):
        x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, solver="ddim", grad="exact")
        (x0 * weight).sum().backward()
    unet_ref = tiny_conditional_unet()
    for name, p in unet_ref.named_parameters():
        p.requires_grad_("up_blocks" in name)
    for _ in range(2):
        x0 = adpm.sample(unet_ref, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, solver="ddim", grad="backprop")
        (x0 * weight).sum().backward()
    for (n, p), (_, q) in zip(unet.named_parameters(), unet_ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12)


def test_lora_adapters_through_peft(inputs):
    from peft import LoraConfig

    unet = tiny_conditional_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    ref = gradients(unet, inputs, "backprop", "dpmpp2m")
    assert ref["weights"] and all("lora" in n for n in ref["weights"])
    assert_same(gradients(unet, inputs, "exact", "dpmpp2m"), ref, rtol=1e-8)


def test_autograd_grad_api_and_non_leaf_conditioning(unet, inputs):
    """torch.autograd.grad works, and cond computed from an upstream leaf receives its gradient."""
    x, cond, _, weight = inputs
    source = cond.clone().requires_grad_()
    params = [p for p in unet.parameters()][:3]
    results = {}
    for mode in ("backprop", "exact", adpm.Adjoint(state="stored")):
        x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=2 * source, solver="ddim", grad=mode)
        results[str(mode)] = torch.autograd.grad((x0 * weight).sum(), [source, *params])
        assert all(p.grad is None for p in unet.parameters()), "autograd.grad must not touch .grad"
    backprop, exact, adjoint = results.values()
    for a, b in zip(exact, backprop):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert all(a.shape == b.shape for a, b in zip(adjoint, backprop))


def test_backprop_matches_finite_differences(unet, inputs):
    """Directional derivatives of L(x_0) along random directions of x_T, cond and one weight tensor."""
    x, cond, uncond, weight = inputs
    param = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    ref = gradients(unet, inputs, "exact", "dpmpp2m")
    g = torch.Generator().manual_seed(5)

    def loss(x=x, cond=cond):
        with torch.no_grad():
            x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, uncond=uncond,
                             guidance_scale=3.0, solver="dpmpp2m", grad=None)
            return (x0 * weight).sum().item()

    eps = 1e-6
    for name, base, grad in (("x_T", x, ref["x_T"]), ("cond", cond, ref["cond"])):
        v = torch.randn(base.shape, dtype=base.dtype, generator=g)
        fd = (loss(**{"x" if name == "x_T" else "cond": base + eps * v}) -
              loss(**{"x" if name == "x_T" else "cond": base - eps * v})) / (2 * eps)
        assert abs(fd - (grad * v).sum().item()) <= 1e-6 * abs(fd), name
    v = torch.randn(param.shape, dtype=param.dtype, generator=g)
    with torch.no_grad():
        param += eps * v
        up = loss()
        param -= 2 * eps * v
        down = loss()
        param += eps * v
    fd = (up - down) / (2 * eps)
    analytic = (ref["weights"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] * v).sum().item()
    assert abs(fd - analytic) <= 1e-6 * abs(fd)
