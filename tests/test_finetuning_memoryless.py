"""Adjoint Matching's memoryless samplers and lean adjoint, in float64.

(c) the VP sampler is diffusers' DDPMScheduler loop, and DDIMScheduler(eta=1)'s, given the same noises;
    the flow SDE step is its formula (written here from the maths, with Flow-GRPO's σ = 1 convention);
(a) at θ = base the lean adjoint ã_k equals autograd's ∂(−λ r(X_K))/∂X_k through the chain with the
    noises frozen, to 1e-8, VP and flow; with LoRA adapters the lean adjoint is the base model's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import adjointdpm as adpm
from adjointdpm.finetuning import AdjointMatchingMethod, BaseModel, MemorylessChain, Rollout, lean_adjoint
from _finetuning_toys import F64, TinyNet, ddim_scheduler, ddpm_scheduler, flow_scheduler


def _rel(a, b):
    """Relative error; diffusers keeps its ᾱ table in float32, so agreement is to about 1e-7."""
    return float((a - b).norm() / b.norm())


def _rollout(net, sched, x, **kw):
    return Rollout(net, x, schedule=sched, timesteps=sched.timesteps, **kw)


def _chain_states(chain, rollout, noises, network=None):
    den = rollout.denoiser(network, guidance_scale=1.0)
    x, states = rollout.initial_state(), [rollout.initial_state()]
    for k in range(chain.num_steps):
        x = chain.step(k, x, den, rollout.cond, None, noises[k])
        states.append(x)
    return states


def test_vp_sampler_is_diffusers_ddpm_loop():
    sched, net = ddpm_scheduler(10), TinyNet()
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(4, 3, dtype=F64, generator=gen)
    noises = adpm.diffusers_draws(torch.Generator().manual_seed(7), sched, x_T, solver="ddpm")
    # diffusers' own loop, drawing from a generator in the same state
    g = torch.Generator().manual_seed(7)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t.reshape(1)), t, x, generator=g).prev_sample
        rollout = _rollout(net, sched, x_T)
        chain = MemorylessChain(rollout)
        ours = _chain_states(chain, rollout, noises)[-1]
    assert _rel(ours, x) <= 1e-6, _rel(ours, x)
    with torch.no_grad():
        other = _chain_states(chain, rollout, torch.flip(noises, [1]))[-1]
    assert _rel(other, x) > 1e-2  # the noises matter
    assert chain.std(len(sched.timesteps) - 1) == 0.0  # DDPMScheduler adds no noise at t = 0


def test_vp_sampler_is_diffusers_ddim_eta_one_loop():
    sched, net = ddim_scheduler(8), TinyNet(seed=1)
    gen = torch.Generator().manual_seed(4)
    x_T = torch.randn(3, 3, dtype=F64, generator=gen)
    noises = torch.randn(8, 3, 3, dtype=F64, generator=gen)
    x = x_T.clone()
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            x = sched.step(net(x, t.reshape(1)), t, x, eta=1.0, variance_noise=noises[k]).prev_sample
        rollout = _rollout(net, sched, x_T, noise=noises)
        ours = _chain_states(MemorylessChain(rollout), rollout, noises)[-1]
    assert _rel(ours, x) <= 1e-6, _rel(ours, x)


def test_vp_noise_std_is_the_engine_step_noise():
    """s_k is exactly the coefficient of ξ in the engine's ddpm step (step with ξ = 1 minus ξ = 0)."""
    sched, net = ddpm_scheduler(6), TinyNet()
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    rollout = _rollout(net, sched, x)
    chain = MemorylessChain(rollout)
    den = rollout.denoiser()
    with torch.no_grad():
        for k in range(6):
            ones, zeros = torch.ones_like(x), torch.zeros_like(x)
            solver = adpm.stochastic.DDPM(den, chain.grid, adpm.stochastic.StoredNoise(torch.stack([ones] * 6)), sched)
            with_noise = solver.step(k, x, (), None, None)[0]
            mean = chain.mean(k, x, den, None, None)
            assert torch.allclose(with_noise - mean, torch.full_like(x, chain.std(k)), rtol=1e-12, atol=1e-12)


def test_flow_sde_step_is_its_formula():
    sched, net = flow_scheduler(6), TinyNet(seed=2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, dtype=F64, generator=gen)
    xi = torch.randn(3, 3, dtype=F64, generator=gen)
    rollout = _rollout(net, sched, x)
    chain = MemorylessChain(rollout)
    sig = [float(s) for s in sched.sigmas]
    assert sig[0] == 1.0 and sig[-1] == 0.0
    with torch.no_grad():
        for k in range(6):
            s, s2 = sig[k], sig[k + 1]
            v = net(x, sched.timesteps[k].reshape(1).to(F64))
            if s < 1.0:
                expected = x + (s2 - s) * (2 * v + x / (1 - s)) + math.sqrt(2 * s * (s - s2) / (1 - s)) * xi
            else:  # Flow-GRPO at σ = 1: 1 − σ in the noise's denominator becomes 1 − σ_1
                std2 = 2 * s / (1 - sig[1])
                expected = (x * (1 + std2 * (s2 - s) / (2 * s)) + v * (s2 - s) * (1 + std2 * (1 - s) / (2 * s))
                            + math.sqrt(std2 * (s - s2)) * xi)
            ours = chain.step(k, x, rollout.denoiser(), None, None, xi)
            assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-12), (k, (ours - expected).abs().max())
    assert chain.std(5) > 0  # the last step to σ = 0 still injects noise on the flow path


@pytest.mark.parametrize("guided", [False, True], ids=["conditional", "guided"])
@pytest.mark.parametrize("flow", [False, True])
def test_lean_adjoint_is_autograd_at_base(flow, guided):
    """With the noises frozen, ã_k = ∂(−λ r(X_K))/∂X_k through the base chain — the conditional one, or the
    classifier-free-guided one (Adjoint Matching's ``guidance=all``)."""
    steps, lam = 7, 3.0
    sched = flow_scheduler(steps) if flow else ddpm_scheduler(steps)
    net = TinyNet(seed=4)
    gen = torch.Generator().manual_seed(11)
    x_T = torch.randn(3, 3, dtype=F64, generator=gen)
    noises = torch.randn(steps, 3, 3, dtype=F64, generator=gen)
    cond = torch.randn(3, 2, dtype=F64, generator=gen)
    uncond = torch.randn(3, 2, dtype=F64, generator=gen) if guided else None
    scale = 3.5 if guided else 1.0
    reward = lambda x: torch.sin(x).sum(1) + 0.3 * (x ** 2).sum(1)
    rollout = _rollout(net, sched, x_T, cond=cond, noise=noises)
    chain = MemorylessChain(rollout)
    den = rollout.denoiser(guidance_scale=scale)
    with torch.no_grad():
        x, states = rollout.initial_state(), [rollout.initial_state()]
        for k in range(steps):
            x = chain.step(k, x, den, cond, uncond, noises[k])
            states.append(x)
    x_end = states[-1].clone().requires_grad_()
    (grad_r,) = torch.autograd.grad(reward(x_end).sum(), x_end)
    adjoints, _ = lean_adjoint(chain, den, states, -lam * grad_r, cond, set(range(steps + 1)), uncond=uncond)
    for k in range(steps + 1):
        x = states[k].clone().requires_grad_()
        y = x
        for j in range(k, steps):
            y = chain.step(j, y, den, cond, uncond, noises[j])
        (expected,) = torch.autograd.grad(-lam * reward(y).sum(), x)
        assert torch.allclose(adjoints[k], expected, rtol=0, atol=1e-8 * (1 + expected.abs().max())), k
    assert adjoints[0].abs().max() > 1e-3  # the check is not vacuous
    if not flow and not guided:  # and through the engine's own ddpm sampler started at X_k, by plain back-propagation
        for k in (0, 3):
            x = states[k].clone().requires_grad_()
            y = adpm.sample(net, x, schedule=sched, timesteps=sched.timesteps[k:], cond=cond, solver="ddpm",
                            noise=noises[k:], grad="backprop")
            (expected,) = torch.autograd.grad(-lam * reward(y).sum(), x)
            assert torch.allclose(adjoints[k], expected, rtol=0, atol=1e-8 * (1 + expected.abs().max())), k


def test_method_lean_adjoint_uses_base_with_lora():
    peft = pytest.importorskip("peft")
    steps = 5
    sched, base = ddpm_scheduler(steps), TinyNet(seed=6)
    tuned = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["inp", "out"], init_lora_weights=False))
    frozen = BaseModel(tuned)
    assert frozen.kind == "peft-model"
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0], dtype=F64)
    with torch.no_grad():
        assert not torch.allclose(tuned(x, t), base(x, t))
        with frozen() as net:
            assert torch.allclose(net(x, t), base(x, t), rtol=0, atol=1e-14)
        assert not torch.allclose(tuned(x, t), base(x, t))  # adapters back on
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
    # Adjoint Matching at a LoRA model: the lean adjoint and μ_base come from the base network
    noises = torch.randn(steps, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    method = AdjointMatchingMethod(reward_scale=2.0, steps=steps, quantile="off")
    method.prepare(tuned)
    report = method.backward(_rollout(tuned, sched, x, noise=noises), lambda y: y.sum(1), torch.Generator().manual_seed(0))
    assert {n: p.requires_grad for n, p in tuned.named_parameters()} == flags
    lora_grads = [p.grad for n, p in tuned.named_parameters() if "lora" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert report.vjp_calls > 0 and math.isfinite(report.loss)



def test_guidance_all_regresses_the_guided_control_at_the_base():
    """``guidance=all``: with the current model equal to the base, the guided control is zero, so the loss is
    the target alone — ‖s_k ã_{k+1}‖² of the guided chain's lean adjoint — and differs from the conditional
    chain's; an unknown value is one line."""
    from adjointdpm.finetuning import MethodError

    with pytest.raises(MethodError, match="guidance must be one of sampling, all"):
        AdjointMatchingMethod(guidance="cfg")
    steps = 5
    sched, net = ddpm_scheduler(steps), TinyNet(seed=6)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, dtype=F64, generator=gen)
    cond, uncond = torch.randn(4, 2, dtype=F64, generator=gen), torch.randn(4, 2, dtype=F64, generator=gen)
    noises = torch.randn(steps, 4, 3, dtype=F64, generator=gen)
    losses = {}
    for guidance in ("sampling", "all"):
        method = AdjointMatchingMethod(reward_scale=2.0, steps=steps, quantile="off", guidance=guidance)
        method.prepare(net)
        rollout = _rollout(net, sched, x, cond=cond, uncond=uncond, guidance_scale=3.0, noise=noises)
        report = method.backward(rollout, lambda y: torch.sin(y).sum(1), torch.Generator().manual_seed(0))
        assert report.stats["control_norm"] == pytest.approx(0.0, abs=1e-20)
        assert report.loss == pytest.approx(report.stats["target_norm"], rel=1e-12)
        losses[guidance] = report.loss
        net.zero_grad(set_to_none=True)
    assert abs(losses["all"] - losses["sampling"]) > 1e-6 * losses["sampling"]


class _LiveSaved:
    """Counts the bytes autograd keeps saved for backward, live at once (a graph freed frees its entries)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        tracker = self

        class Entry:
            def __init__(self):
                self.t, self.n = t, t.numel() * t.element_size()
                tracker.live += self.n
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self):
                tracker.live -= self.n

        return Entry()

    @staticmethod
    def unpack(entry):
        return entry.t


def test_lean_adjoint_memory_is_flat_in_the_steps():
    """One step's graph at a time: the peak of saved activations is the same for 4 and 16 steps."""
    peaks = []
    for steps in (4, 16):
        sched, net = ddpm_scheduler(steps), TinyNet(seed=9)
        x = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        noises = torch.randn(steps, 64, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
        rollout = _rollout(net, sched, x, noise=noises)
        chain = MemorylessChain(rollout)
        with torch.no_grad():
            states = _chain_states(chain, rollout, noises)
        tracker = _LiveSaved()
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            adjoints, _ = lean_adjoint(chain, rollout.denoiser(guidance_scale=1.0), states, torch.ones_like(x), None, {0})
        assert set(adjoints) == {0} and tracker.peak > 0
        peaks.append(tracker.peak)
    assert peaks[0] == peaks[1], peaks
