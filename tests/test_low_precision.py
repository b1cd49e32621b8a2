"""Half precision: bfloat16 weights or bf16 autocast give finite gradients close to float64 ones, with
float32 accumulation, and the recomputing backward pass runs under the forward pass's autocast state."""

import pytest
import torch
from diffusers import DDIMScheduler

import adjointdpm as adpm
from conftest import SD_BETAS, tiny_conditional_unet

SCHEDULE = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))
TIMESTEPS = [999, 700, 400, 150, 20]


def grads(unet, inputs, grad, dtype, autocast=False):
    x, cond, uncond, weight = (t.detach().to(dtype, copy=True) for t in inputs)
    unet.zero_grad(set_to_none=True)
    x, cond = x.requires_grad_(), cond.requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, solver="dpmpp2m", grad=grad)
    (x0.double() * weight.double()).sum().backward()
    return x.grad, cond.grad, {n: p.grad for n, p in unet.named_parameters()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def truth(inputs, grad):
    """The same mode in float64: what is left is the precision loss alone."""
    return grads(tiny_conditional_unet(), inputs, grad, torch.float64)


@pytest.mark.parametrize("grad", ["exact", adpm.Adjoint(state="stored"), "checkpoint"])
def test_autocast_bf16(inputs, grad):
    unet = tiny_conditional_unet().float()
    exact = truth(inputs, grad)
    reference = grads(unet, inputs, "backprop", torch.float32, autocast=True)
    got = grads(unet, inputs, grad, torch.float32, autocast=True)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[2].values())
    if grad == "exact":
        # the backward recomputation runs the same bf16 kernels as autograd under autocast: x_T's gradient is
        # identical (it would differ by ~1e-2 if the recomputation ran in float32)
        assert rel(got[0], reference[0]) < 1e-6
        # autograd sums the N steps' cond cotangents in bf16 (autocast casts cond once); we sum in float32
        assert rel(got[1], exact[1]) <= rel(reference[1], exact[1]) + 1e-3
    for a, b in zip(got[:2], exact[:2]):
        assert rel(a, b) < 0.05


@pytest.mark.parametrize("grad", ["exact", "adjoint"])
def test_bfloat16_weights(inputs, grad):
    exact = truth(inputs, grad)
    unet = tiny_conditional_unet().to(torch.bfloat16)
    got = grads(unet, inputs, grad, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in got[2].values())
    flat = torch.cat([g.flatten() for g in got[2].values()])
    flat_truth = torch.cat([g.flatten() for g in exact[2].values()])
    assert rel(got[0], exact[0]) < 0.1 and rel(flat, flat_truth) < 0.1
