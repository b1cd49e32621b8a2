"""Every model family (SDXL, SD3, Flux, PixArt, DiT) through the engine: the forward pass equals the
family's diffusers loop with each scheduler the engine claims to reproduce, and every gradient mode that
claims the exact gradient equals float64 back-propagation for x_T, every conditioning tensor (nested ones
included) and the weights; back-propagation equals finite differences on one VP and one flow family."""

import numpy as np
import pytest
import torch

import adjointdpm as adpm
from _tiny_networks import FAMILIES, SOLVER_OF, diffusers_loop, schedulers
from adjointdpm.conditioning import floating_leaves, map_floating


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _setup(name, batch=2, seed=1):
    family = FAMILIES[name]
    net = family.network()
    x, cond, uncond = family.inputs(torch.Generator().manual_seed(seed), batch)
    return family, net, x, cond, uncond


def _sample(family, net, x, cond, uncond, scheduler, solver, grad):
    w = family.guidance
    return adpm.sample(net, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond,
                       uncond=uncond if w != 1 else None, guidance_scale=w, solver=solver, grad=grad)


FORWARD_CASES = [(name, sched) for name, fam in FAMILIES.items() for sched in schedulers(fam)]


@pytest.mark.parametrize("name, scheduler_name", FORWARD_CASES)
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_forward_equals_the_diffusers_loop(name, scheduler_name, steps):
    family, net, x, cond, uncond = _setup(name)
    scheduler = schedulers(family)[scheduler_name](steps)
    reference = diffusers_loop(family, net, scheduler, x, cond, uncond)
    ours = _sample(family, net, x, cond, uncond, scheduler, SOLVER_OF[scheduler_name], None)
    assert ours.shape == reference.shape
    assert _rel(ours, reference) <= 1e-5, f"{name}/{scheduler_name}/{steps}: {_rel(ours, reference):.2e}"


def _gradients(family, net, x, cond, uncond, scheduler, solver, grad, weight):
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    cond = map_floating(lambda t: t.clone().requires_grad_(), cond)
    uncond = map_floating(lambda t: t.clone().requires_grad_(), uncond)
    x0 = _sample(family, net, x, cond, uncond, scheduler, solver, grad)
    (x0 * weight).sum().backward()
    leaves = [x, *floating_leaves(cond)] + (floating_leaves(uncond) if family.guidance != 1 else [])
    grads = [leaf.grad for leaf in leaves]
    grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    return grads


GRAD_CASES = [(name, sched) for name, fam in FAMILIES.items() for sched in list(schedulers(fam))[::2]]


@pytest.mark.parametrize("name, scheduler_name", GRAD_CASES)
@pytest.mark.parametrize("mode", ["exact", "checkpoint"])
def test_exact_modes_equal_backprop_for_every_tensor(name, scheduler_name, mode):
    family, net, x, cond, uncond = _setup(name)
    scheduler = schedulers(family)[scheduler_name](4)
    weight = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    solver = SOLVER_OF[scheduler_name]
    ref = _gradients(family, net, x, cond, uncond, scheduler, solver, "backprop", weight)
    got = _gradients(family, net, x, cond, uncond, scheduler, solver, mode, weight)
    assert all(g is not None for g in ref), "backprop reached every floating input"
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a is not None, f"input {i} received no gradient in mode {mode}"
        assert _rel(a, b) <= 1e-8, f"input {i}: {_rel(a, b):.2e}"


@pytest.mark.parametrize("name, scheduler_name", [("sdxl", "dpm"), ("sd3", "flowmatch_euler")])
def test_backprop_equals_finite_differences(name, scheduler_name):
    family, net, x, cond, uncond = _setup(name, batch=1)
    scheduler = schedulers(family)[scheduler_name](3)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    solver = SOLVER_OF[scheduler_name]
    grads = _gradients(family, net, x, cond, uncond, scheduler, solver, "backprop", weight)
    pooled_key = "added_cond_kwargs" if name == "sdxl" else "pooled_projections"

    def loss(dx, dp):
        c = {k: v for k, v in cond.items()}
        if name == "sdxl":
            c["added_cond_kwargs"] = dict(cond["added_cond_kwargs"], text_embeds=cond["added_cond_kwargs"]["text_embeds"] + dp)
        else:
            c[pooled_key] = cond[pooled_key] + dp
        with torch.no_grad():
            return (_sample(family, net, x + dx, c, uncond, scheduler, solver, None) * weight).sum()

    pooled = cond["added_cond_kwargs"]["text_embeds"] if name == "sdxl" else cond[pooled_key]
    pooled_index = 1 + [id(t) for t in floating_leaves(cond)].index(id(pooled))
    vx = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    vp = torch.randn(pooled.shape, dtype=x.dtype, generator=gen)
    h = 1e-5
    fd_x = (loss(h * vx, 0) - loss(-h * vx, 0)) / (2 * h)
    fd_p = (loss(0, h * vp) - loss(0, -h * vp)) / (2 * h)
    assert abs(fd_x - (grads[0] * vx).sum()) <= 1e-6 * max(1.0, abs(fd_x))
    assert abs(fd_p - (grads[pooled_index] * vp).sum()) <= 1e-6 * max(1.0, abs(fd_p))


def _smooth_flow_network():
    """A smooth velocity field (so the ODE is well resolved at few steps) with weights and conditioning."""

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.a = torch.nn.Parameter(0.3 * torch.randn(4, 4, dtype=torch.float64, generator=g))
            self.b = torch.nn.Parameter(0.2 * torch.randn(4, dtype=torch.float64, generator=g))

        def forward(self, x, t, cond):
            s = (t / 1000).view(-1, 1, 1, 1)
            mixed = torch.einsum("oc,bchw->bohw", self.a, x)
            return torch.tanh(mixed + self.b.view(1, -1, 1, 1) * s) + cond.view(-1, 4, 1, 1) * (1 - s)

    return Velocity()


@pytest.mark.parametrize("solver, state, min_order", [("ddim", "backsolve", 0.85), ("ddim", "stored", 0.85),
                                                      ("heun", "stored", 1.7), ("dpmpp2m", "stored", 1.4)])
def test_continuous_adjoint_converges_on_a_flow_model(solver, state, min_order):
    net = _smooth_flow_network()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=gen)
    cond = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    weight = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    schedule = adpm.FlowMatchingSchedule(shift=3.0)

    def grads(grad, n):
        net.zero_grad(set_to_none=True)
        xs, cs = x.clone().requires_grad_(), cond.clone().requires_grad_()
        x0 = adpm.sample(net, xs, schedule=schedule, steps=n, cond=cs, solver=solver, grad=grad,
                         prediction_type="flow_prediction")
        (x0 * weight).sum().backward()
        return [xs.grad, cs.grad, torch.cat([p.grad.flatten() for p in net.parameters()])]

    errors = []
    for n in (10, 20, 40):
        exact = grads("exact", n)
        errors.append([_rel(a, b) for a, b in zip(grads(adpm.Adjoint(state=state), n), exact)])
    errors = np.array(errors)
    orders = np.log2(errors[:-1] / errors[1:])
    print(f"\nflow {solver}/{state}: errors (N=10,20,40 × x_T, cond, weights)\n{errors}\norders\n{orders}")
    assert np.all(errors[1:] < errors[:-1]), errors
    assert np.all(orders[-1] >= min_order), orders  # the asymptotic order, from N = 20 to 40


@pytest.mark.parametrize("grad, solver", [(g, s) for g in ("adjoint", "truncated", "exact") for s in ("ddim", "heun", "dpmpp2m")]
                         + [("reversible", "ddim")])  # EDICT is defined on the DDIM step only
def test_every_mode_runs_on_a_flow_model_from_sigma_one(grad, solver):
    """α = 0 at the first FlowMatchEuler timestep: nothing divides by it (finite samples and gradients)."""
    family, net, x, cond, uncond = _setup("sd3")
    scheduler = schedulers(family)["flowmatch_euler"](4)
    assert float(scheduler.sigmas[0]) == 1.0
    x = x.clone().requires_grad_()
    x0 = _sample(family, net, x, cond, uncond, scheduler, solver, grad)
    x0.square().sum().backward()
    assert torch.isfinite(x0).all() and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_reversible_inversion_equals_autograd_on_flow():
    family, net, x, cond, uncond = _setup("sd3")
    scheduler = schedulers(family)["flowmatch_euler"](4)
    out = []
    for backward in ("invert", "autograd"):
        xs = x.clone().requires_grad_()
        x0 = _sample(family, net, xs, cond, uncond, scheduler, "ddim", adpm.Reversible(backward=backward))
        x0.square().sum().backward()
        out.append((x0.detach(), xs.grad))
    assert _rel(out[0][0], out[1][0]) <= 1e-12
    assert _rel(out[0][1], out[1][1]) <= 1e-8


def test_classifier_guidance_is_differentiated_exactly():
    """ε̂ − sσ∇ log p(y|x): exact equals backprop (a double backward) and finite differences; the guidance
    changes the sample."""
    family, net, x, cond, uncond = _setup("sdxl", batch=1)
    scheduler = schedulers(family)["ddim"](3)
    probe = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def log_p(x_t, t):
        return torch.nn.functional.logsigmoid((x_t.mean(dim=(2, 3)) * probe).sum(-1) * (1 + t / 1000)).sum()

    def run(xs, grad, scale=2.0):
        return adpm.sample(net, xs, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, uncond=uncond,
                           guidance_scale=3.0, solver="ddim", grad=grad, classifier=log_p, classifier_scale=scale)

    grads = {}
    for mode in ("backprop", "exact", "checkpoint"):
        xs = x.clone().requires_grad_()
        run(xs, mode).square().sum().backward()
        grads[mode] = xs.grad
    assert _rel(grads["exact"], grads["backprop"]) <= 1e-8
    assert _rel(grads["checkpoint"], grads["backprop"]) <= 1e-8
    v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(6))
    h = 1e-5
    with torch.no_grad():
        fd = (run(x + h * v, None).square().sum() - run(x - h * v, None).square().sum()) / (2 * h)
    assert abs(fd - (grads["backprop"] * v).sum()) <= 1e-6 * max(1.0, abs(fd))
    with torch.no_grad():
        assert _rel(run(x, None, scale=0.0), run(x, None)) > 1e-4


def test_uncond_dict_shares_keys_only_in_cond():
    """A key only in cond is used for both halves of the guided call: equal to giving it in both."""
    family, net, x, cond, uncond = _setup("sdxl")
    scheduler = schedulers(family)["ddim"](3)
    partial = {"encoder_hidden_states": uncond["encoder_hidden_states"],
               "added_cond_kwargs": {"text_embeds": uncond["added_cond_kwargs"]["text_embeds"]}}
    a = _sample(family, net, x, cond, uncond, scheduler, "ddim", None)
    b = _sample(family, net, x, cond, partial, scheduler, "ddim", None)
    assert _rel(a, b) <= 1e-14


def _bad(name, change):
    family, net, x, cond, uncond = _setup(name)
    scheduler = schedulers(family)["ddim" if not family.flow else "flowmatch_euler"](2)
    args = dict(schedule=scheduler, timesteps=scheduler.timesteps, cond=cond,
                uncond=uncond if family.guidance != 1 else None, guidance_scale=family.guidance)
    changed = change(x, args)
    x = x if changed is None else changed
    return lambda: adpm.sample(net, x, **args)


def _drop(key):
    def change(x, args):
        args["cond"] = {k: v for k, v in args["cond"].items() if k != key}
        if args["uncond"] is not None:
            args["uncond"] = {k: v for k, v in args["uncond"].items() if k != key}
    return change


@pytest.mark.parametrize("name, change, error, message", [
    ("sd3", _drop("pooled_projections"), ValueError, r"needs cond\['pooled_projections'\]"),
    ("flux", _drop("img_ids"), ValueError, r"needs cond\['img_ids'\]"),
    ("flux", lambda x, a: x.reshape(2, 4, 8, 8), ValueError, "takes packed latents"),
    ("sdxl", lambda x, a: a["cond"].update(pooled=a["cond"]["encoder_hidden_states"]), ValueError,
     "cond has key 'pooled' that UNet2DConditionModel does not take"),
    ("sdxl", lambda x, a: a.update(uncond=a["uncond"]["encoder_hidden_states"]), TypeError, "same structure"),
    ("sd3", lambda x, a: a["uncond"].update(extra=a["uncond"]["pooled_projections"]), ValueError, "'extra' that cond lacks"),
    ("sd3", lambda x, a: a["uncond"].update(pooled_projections=a["uncond"]["pooled_projections"][:, :5]), ValueError,
     r"uncond\['pooled_projections'\] has shape \(2, 5\)"),
    ("pixart", lambda x, a: [a[k].update(encoder_hidden_states=a[k]["encoder_hidden_states"][..., :8])
                             for k in ("cond", "uncond")] and None, ValueError, "caption_channels is 16"),
    ("sdxl", lambda x, a: a["cond"]["added_cond_kwargs"].update(time_ids=torch.zeros(3, 6, dtype=torch.float64)),
     ValueError, r"cond\['added_cond_kwargs'\]\['time_ids'\] has batch 3"),
])
def test_family_bad_input(name, change, error, message):
    with pytest.raises(error, match=message):
        _bad(name, change)()


def test_a_scheduler_the_engine_cannot_reproduce_is_refused():
    from diffusers import EDMEulerScheduler

    family, net, x, cond, uncond = _setup("sd3")
    scheduler = EDMEulerScheduler()
    scheduler.set_timesteps(3)
    with pytest.raises(TypeError, match="has no `alphas_cumprod`"):
        adpm.sample(net, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, uncond=uncond, guidance_scale=3.0)


@pytest.mark.parametrize("steps", [3, 7])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_steps_to_its_own_previous_timestep(spacing, steps):
    """DDIMScheduler steps from t to t − T//N, which is not the next listed timestep for these grids."""
    from diffusers import DDIMScheduler

    from conftest import SD_BETAS

    family, net, x, cond, uncond = _setup("sdxl")
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.numpy()
    assert not np.array_equal(ts[:-1] - 1000 // steps, ts[1:])
    reference = diffusers_loop(family, net, scheduler, x, cond, uncond)
    ours = _sample(family, net, x, cond, uncond, scheduler, "ddim", None)
    assert _rel(ours, reference) <= 1e-5
