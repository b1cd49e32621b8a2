"""Every bad input raises one clear error that names the fix."""

import pytest
import torch
from diffusers import DDIMScheduler

import adjointdpm as adpm
from _helpers import PoisonGradient
from conftest import SD_BETAS

SCHEDULE = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))


def run(unet, x, cond, **kw):
    args = dict(schedule=SCHEDULE, steps=3, cond=cond, solver="ddim", grad="exact")
    args.update(kw)
    return adpm.sample(unet, x, **args)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x, c, u: dict(x=x[0]), ValueError, r"shape \(B, C, H, W\)"),
        (lambda x, c, u: dict(x=x[0, 0, 0]), ValueError, "batch dimension"),
        (lambda x, c, u: dict(x=x.float(), cond=c.float()), TypeError, "weights are torch.float64 but x_T is torch.float32"),
        (lambda x, c, u: dict(x=x[:, :1]), ValueError, "in_channels=2"),
        (lambda x, c, u: dict(x=(x * float("nan"))), ValueError, "x_T contains NaN"),
        (lambda x, c, u: dict(x=x.long()), TypeError, "floating-point"),
        (lambda x, c, u: dict(cond=None), ValueError, "pass cond="),
        (lambda x, c, u: dict(cond=c.float()), TypeError, "cond is torch.float32 but x_T is torch.float64"),
        (lambda x, c, u: dict(cond=c[..., :4]), ValueError, "cross_attention_dim is 8"),
        (lambda x, c, u: dict(cond=torch.cat([c, c, c])), ValueError, "batch 1 or 2"),
        (lambda x, c, u: dict(cond=c.clone().fill_(float("inf"))), ValueError, "cond contains NaN or inf"),
        (lambda x, c, u: dict(guidance_scale=7.5), ValueError, "needs both cond and uncond"),
        (lambda x, c, u: dict(uncond=u), ValueError, "guidance_scale is 1"),
        (lambda x, c, u: dict(uncond=u[:, :2], guidance_scale=2.0), ValueError, "empty prompt"),
        (lambda x, c, u: dict(timesteps=[100, 500, 900], steps=None), ValueError, "strictly decreasing"),
        (lambda x, c, u: dict(timesteps=[1200, 500], steps=None), ValueError, r"lie in \[0, 999\]"),
        (lambda x, c, u: dict(timesteps=[500, -3], steps=None), ValueError, r"lie in \[0, 999\]"),
        (lambda x, c, u: dict(timesteps=[[500, 400]], steps=None), ValueError, "1-D"),
        (lambda x, c, u: dict(timesteps=[500, 400]), ValueError, "not both"),
        (lambda x, c, u: dict(steps=None), ValueError, "timesteps=… .* or steps=N"),
        (lambda x, c, u: dict(steps=0), ValueError, "steps must be an integer ≥ 1"),
        (lambda x, c, u: dict(steps=2.5), ValueError, "steps must be an integer ≥ 1"),
        (lambda x, c, u: dict(solver="euler_a"), ValueError, "unknown solver 'euler_a'; use one of ddim, dpmpp2m, heun"),
        (lambda x, c, u: dict(grad="magic"), ValueError, "unknown grad mode 'magic'"),
        (lambda x, c, u: dict(prediction_type="flux"), ValueError, "unknown prediction_type 'flux'"),
        (lambda x, c, u: dict(params=[torch.ones(2, dtype=x.dtype, requires_grad=True) * 2]), ValueError,
         "a tensor in params is computed from other tensors"),
    ],
)
def test_bad_input(unet, inputs, change, error, message):
    x, cond, uncond, _ = inputs
    kw = change(x, cond, uncond)
    x_in = kw.pop("x", x)
    cond_in = kw.pop("cond", cond)
    with pytest.raises(error, match=message):
        run(unet, x_in, cond_in, **kw)


def test_bad_mode_options():
    with pytest.raises(ValueError, match="unknown adjoint state"):
        adpm.Adjoint(state="cached")
    with pytest.raises(ValueError, match="unknown adjoint solver"):
        adpm.Adjoint(solver="rk4")
    with pytest.raises(ValueError, match="positive integer"):
        adpm.Adjoint(steps=0)
    with pytest.raises(ValueError, match="k ≥ 1"):
        adpm.Truncated(k=0)


def test_devices_must_match(unet, inputs):
    x, cond, _, _ = inputs
    with pytest.raises(ValueError, match="cond is on cpu but x_T is on meta"):
        run(unet, x.to("meta"), cond)
    with pytest.raises(ValueError, match=r"the model is on cpu but x_T is on meta; call model.to\('meta'\)"):
        run(unet, x.to("meta"), cond.to("meta"))


@pytest.mark.parametrize("grad", ["exact", "adjoint", "backprop", "checkpoint", "truncated"])
def test_non_finite_incoming_gradient(unet, inputs, grad):
    x, cond, _, _ = inputs
    x = x.clone().requires_grad_()
    x0 = run(unet, x, cond, grad=grad)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        (x0 * float("nan")).sum().backward()


@pytest.mark.parametrize("grad", ["exact", "adjoint"])
def test_non_finite_gradient_is_reported_at_its_step(unet, inputs, grad):
    """A network whose backward at one time yields NaN: the error names that sampling step."""
    x, cond, _, _ = inputs

    def network(x, t, c):
        out = unet(x, t, encoder_hidden_states=c).sample
        return PoisonGradient.apply(out) if float(t[0]) == 500.0 else out

    x = x.clone().requires_grad_()
    x0 = adpm.sample(network, x, schedule=SCHEDULE, timesteps=[999, 750, 500, 250, 0], cond=cond, grad=grad)
    with pytest.raises(FloatingPointError, match=r"sampling step 2 \(model time 500\)"):
        x0.sum().backward()
