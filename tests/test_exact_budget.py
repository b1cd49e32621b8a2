"""Exact(memory=…): keeping some steps' autograd graphs changes the cost, never the gradient."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

import adjointdpm as adpm
from adjointdpm.gradients import Backprop
from adjointdpm.gradients.memory_budget import SavedActivations, parse_memory, steps_to_keep
from adjointdpm.solvers import DDIM, TimeGrid
from conftest import SD_BETAS, tiny_conditional_unet

SCHEDULE = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))
TIMESTEPS = [999, 801.5, 600, 350.25, 120, 20]
SOME = "8MiB"  # about three network calls' graphs of the tiny UNet (2.7 MB each): some steps kept, not all


def gradients(unet, inputs, grad, solver, calls=None):
    x, cond, uncond, weight = inputs
    unet.zero_grad(set_to_none=True)
    x, cond, uncond = (t.clone().requires_grad_() for t in (x, cond, uncond))
    x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, uncond=uncond,
                     guidance_scale=3.0, solver=solver, grad=grad)
    forward_calls = calls[0] if calls else 0
    (x0 * weight).sum().backward()
    if calls:
        calls.append(calls[0] - forward_calls)  # network calls made by the backward pass
    flat = torch.cat([p.grad.flatten() for p in unet.parameters()])
    return {"x_T": x.grad, "cond": cond.grad, "uncond": uncond.grad, "weights": flat}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m", "heun"])
def test_every_budget_gives_backprops_gradient(unet, inputs, solver):
    ref = gradients(unet, inputs, "backprop", solver)
    recomputed = {}
    for memory in (None, 0, SOME, math.inf):
        calls = [0]
        handle = unet.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        got = gradients(unet, inputs, adpm.Exact(memory=memory), solver, calls)
        handle.remove()
        recomputed[memory] = calls[-1]
        for key in ref:
            assert rel(got[key], ref[key]) <= 1e-10, (memory, key, rel(got[key], ref[key]))
    n_calls = calls[0] - calls[-1]  # the forward pass's calls
    assert recomputed[None] == recomputed[0] == n_calls  # no budget: every step recomputed
    assert 0 < recomputed[SOME] < n_calls  # a budget: some steps replayed from their kept graphs
    assert recomputed[math.inf] == 0  # unlimited: nothing recomputed, as back-propagation


def test_existing_grads_are_added_to(inputs):
    """Two backward passes without zeroing add up, as with plain autograd, for a weight subset."""
    x, cond, uncond, weight = inputs
    results = []
    for grad in ("backprop", adpm.Exact(memory=SOME), adpm.Exact(memory=math.inf)):
        unet = tiny_conditional_unet()
        for name, p in unet.named_parameters():
            p.requires_grad_("up_blocks" in name)
        for _ in range(2):
            x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, solver="ddim", grad=grad)
            (x0 * weight).sum().backward()
        assert all((p.grad is None) != p.requires_grad for p in unet.parameters())
        results.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad]))
    for got in results[1:]:
        assert rel(got, results[0]) <= 1e-10


def test_autograd_grad_leaves_dot_grad_alone(unet, inputs):
    x, cond, _, weight = inputs
    source = cond.clone().requires_grad_()
    params = list(unet.parameters())[:3]
    out = {}
    for grad in ("backprop", adpm.Exact(memory=math.inf), adpm.Exact(memory=SOME)):
        x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=2 * source, solver="dpmpp2m", grad=grad)
        out[str(grad)] = torch.autograd.grad((x0 * weight).sum(), [source, *params])
        assert all(p.grad is None for p in unet.parameters())
    ref, *others = out.values()
    for got in others:
        for a, b in zip(got, ref):
            assert rel(a, b) <= 1e-10


class DictSolver(DDIM):
    """DDIM on a toy network whose conditioning is a dict tree: {"scale": s, "extra": {"shift": b}}."""

    def __init__(self, weight):
        grid = TimeGrid.from_timesteps(SCHEDULE, TIMESTEPS)
        super().__init__(None, grid)
        self.weight = weight

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        eps = torch.tanh(x * cond["scale"] + cond["extra"]["shift"]) @ self.weight
        eps = eps + 0.5 * torch.sin(uncond["scale"] * x)
        x0 = (x - float(g.sigma[i]) * eps) / float(g.alpha[i])
        if i == self.num_steps - 1:
            return x0, ()
        return float(g.alpha[i + 1]) * x0 + float(g.sigma[i + 1]) * eps, ()


@pytest.mark.parametrize("memory", [0, 40_000, math.inf])
def test_conditioning_trees(memory):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 8, dtype=torch.float64, generator=g).requires_grad_()
    solver = DictSolver(weight)
    leaves = [torch.randn(4, 8, dtype=torch.float64, generator=g) for _ in range(4)]
    results = []
    for mode in (Backprop(), adpm.Exact(memory=memory)):
        x, s, b, u = (t.clone().requires_grad_() for t in leaves[:3] + leaves[3:])
        weight.grad = torch.ones_like(weight)  # an existing gradient is added to
        cond, uncond = {"scale": s, "extra": {"shift": b, "tag": "kept as it is"}}, {"scale": u}
        x0 = mode.run(solver, x, cond, uncond, [weight])
        x0.square().sum().backward()
        results.append([x.grad, s.grad, b.grad, u.grad, weight.grad.clone()])
    for a, b in zip(*results):
        assert rel(a, b) <= 1e-10


def test_autocast_and_bfloat16(inputs):
    """bf16 autocast: the kept graphs were built under the forward pass's autocast, as back-propagation's."""
    unet = tiny_conditional_unet().float()
    x, cond, uncond, weight = (t.float() for t in inputs)
    out = []
    for grad in ("backprop", adpm.Exact(memory=math.inf), adpm.Exact(memory="4MiB")):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            x0 = adpm.sample(unet, xx, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, solver="dpmpp2m", grad=grad)
        (x0.float() * weight).sum().backward()
        out.append(xx.grad)
    assert rel(out[1], out[0]) < 1e-6 and rel(out[2], out[0]) < 1e-6
    unet = unet.to(torch.bfloat16)
    xx = x.to(torch.bfloat16).requires_grad_()
    x0 = adpm.sample(unet, xx, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond.to(torch.bfloat16),
                     solver="ddim", grad=adpm.Exact(memory="4MiB"))
    (x0.float() * weight).sum().backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads) and torch.isfinite(xx.grad).all()


def test_parse_memory():
    assert parse_memory(None) is None
    assert parse_memory("8GiB") == 8 * 2**30 and parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1.5GB") == 1.5e9 and parse_memory("100kb") == 1e5 and parse_memory(4096) == 4096
    assert parse_memory("inf") == math.inf == parse_memory(float("inf"))
    for bad in ("8 gigs", "GiB", "-1MiB", "", "1e3xb"):
        with pytest.raises(ValueError, match="is not a size|must be a size") as err:
            adpm.Exact(memory=bad)
        assert "\n" not in str(err.value) and "'8GiB'" in str(err.value)
    with pytest.raises(ValueError):
        parse_memory(-5)
    with pytest.raises(TypeError):
        adpm.Exact(memory=True)


def test_steps_to_keep_is_the_longest_fitting_suffix():
    assert steps_to_keep([1] * 5, 10, 0) == 5
    assert steps_to_keep([1] * 5, 10, 29.9) == 3
    assert steps_to_keep([1] * 5, 10, 50) == 0
    assert steps_to_keep([2, 2, 2, 1], 10, 30) == 2  # Heun: the final one-call step, then one two-call step
    assert steps_to_keep([2, 2, 2, 1], 0, 0) == 0  # nothing saved: everything fits


def test_saved_activations_count_activations_not_weights():
    layer = torch.nn.Linear(512, 512)  # 1 MiB of weights
    x = torch.randn(4, 512, requires_grad=True)
    with SavedActivations() as saved:
        y = torch.tanh(layer(x))  # saves x (a leaf: not counted), the weight (not counted) and tanh's output
    assert saved.bytes == y.numel() * 4


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_model_families_with_nested_conditioning(name):
    """SDXL (nested added_cond_kwargs, guidance) and Flux (flow matching, ids): every floating input's gradient."""
    from _tiny_networks import FAMILIES, SOLVER_OF, schedulers
    from adjointdpm.conditioning import floating_leaves, map_floating

    family = FAMILIES[name]
    net = family.network()
    x, cond, uncond = family.inputs(torch.Generator().manual_seed(1), 2)
    scheduler_name, make = next(iter(schedulers(family).items()))
    scheduler = make(4)
    weight = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    results = []
    for grad in ("backprop", adpm.Exact(memory=0), adpm.Exact(memory="200KiB"), adpm.Exact(memory=math.inf)):
        net.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        c = map_floating(lambda t: t.clone().requires_grad_(), cond)
        u = map_floating(lambda t: t.clone().requires_grad_(), uncond)
        w = family.guidance
        x0 = adpm.sample(net, xx, schedule=scheduler, timesteps=scheduler.timesteps, cond=c, uncond=u if w != 1 else None,
                         guidance_scale=w, solver=SOLVER_OF[scheduler_name], grad=grad)
        (x0 * weight).sum().backward()
        leaves = [xx, *floating_leaves(c)] + (floating_leaves(u) if w != 1 else [])
        results.append([leaf.grad for leaf in leaves] +
                       [torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])])
    ref, *others = results
    assert all(g is not None for g in ref) and len(ref) > 3
    for got in others:
        for a, b in zip(got, ref):
            assert rel(a, b) <= 1e-10


@pytest.mark.parametrize("case", ["ddpm", "dpmpp2m_sde"])
def test_stochastic_samplers_and_their_noises(case):
    """Injected noises that require grad: the kept graphs hand their gradient back like every other input."""
    from test_stochastic import CASES, _gradients, _noise, _setup

    name, make, solver, eta, _ = CASES[case]
    family, net, x, cond, uncond = _setup(name)
    noise = _noise(3, x)
    weight = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    ref = _gradients(family, net, x, cond, uncond, make(3), solver, eta, noise, "backprop", weight)
    for memory in ("64KiB", math.inf):
        got = _gradients(family, net, x, cond, uncond, make(3), solver, eta, noise, adpm.Exact(memory=memory), weight)
        for a, b in zip(got, ref):
            assert rel(a, b) <= 1e-10
