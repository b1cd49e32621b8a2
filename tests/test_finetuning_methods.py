"""The six fine-tuning methods behind one interface, in float64 on small networks.

Each method's gradient against an independent computation (plain autograd, or a diffusers loop), its
measured model calls against the network's own counters and the count it should be, and a short
fine-tune on a toy problem (Gaussian data, linear reward) that raises the reward on fresh samples.
"""

from __future__ import annotations

import pytest
import torch

import adjointdpm as adpm
from adjointdpm.finetuning import (METHODS, AdjointMatchingMethod, AlignPropMethod, ExactMethod,
                                   Method, MethodError, OneStepMethod, Rollout, TruncatedMethod, parse_method)
from _finetuning_toys import F64, TinyNet, cosine, ddim_scheduler, ddpm_scheduler, gaussian_problem, linear_reward

B, N = 3, 6


def _reward(x):
    return torch.sin(x).sum(1) + 0.2 * (x * x).sum(1)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, dtype=F64, generator=gen), torch.randn(B, 2, dtype=F64, generator=gen),
            torch.randn(1, 2, dtype=F64, generator=gen))


def _rollout(net, sched, **kw):
    x, cond, uncond = _inputs()
    kw.setdefault("cond", cond)
    kw.setdefault("uncond", uncond)
    kw.setdefault("guidance_scale", 2.5)
    return Rollout(net, x, schedule=sched, timesteps=sched.timesteps, **kw)


def _grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def _method_grads(method, rollout, seed=0):
    net = rollout.network
    net.zero_grad(set_to_none=True)
    net.calls = net.vjps = 0
    report = method.backward(rollout, _reward, torch.Generator().manual_seed(seed))
    report.counted = (net.calls, net.vjps)  # the network's own count of this call alone
    return _grads(net), report


def _reference(rollout, loss_of_x0):
    net = rollout.network
    x0 = adpm.sample(net, rollout.x_T, grad="backprop", **rollout.sample_kwargs())
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss_of_x0(x0), list(net.parameters()))])


# --------------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
@pytest.mark.parametrize("memory", [None, "inf"])
def test_exact_is_backprop_of_minus_the_mean_reward(solver, memory):
    net = TinyNet()
    sched = ddpm_scheduler(N)
    noise = torch.randn(N, B, 3, dtype=F64, generator=torch.Generator().manual_seed(9)) if solver == "ddpm" else None
    rollout = _rollout(net, sched, solver=solver, noise=noise)
    grads, report = _method_grads(ExactMethod(memory=memory), rollout)
    expected = _reference(rollout, lambda x0: -_reward(x0).mean())
    assert torch.allclose(grads, expected, rtol=1e-10, atol=1e-12)
    assert (report.forward_calls, report.vjp_calls) == report.counted
    assert (report.forward_calls, report.vjp_calls) == ((N if memory else 2 * N), N)
    assert report.rewards.shape == (B,) and abs(report.loss + float(report.rewards.mean())) < 1e-12


# --------------------------------------------------------------------------------------- KL anchor
def _kl_reference(rollout, base, beta, steps, seed):
    """−mean r(x_0) + β·A written from its definition: the grid points and ξ drawn as the anchor draws them
    from the method's generator, α, σ from the scheduler's ᾱ, ε̂ the networks' outputs (ε-prediction)."""
    net, sched = rollout.network, rollout.schedule
    gen = torch.Generator().manual_seed(seed)
    points = sorted(int(i) for i in torch.randperm(N, generator=gen)[:steps])
    xi = torch.randn((len(points), B, 3), generator=gen, dtype=F64)
    x0 = adpm.sample(net, rollout.x_T, grad="backprop", **rollout.sample_kwargs())
    terms = []
    for j, i in enumerate(points):
        t = sched.timesteps[i]
        abar = sched.alphas_cumprod[int(t)].to(F64)
        x_i = abar.sqrt() * x0.detach() + (1 - abar).sqrt() * xi[j]
        t_vec = torch.full((B,), float(t), dtype=F64)
        with torch.no_grad():
            target = base(x_i, t_vec, rollout.cond)
        terms.append((net(x_i, t_vec, rollout.cond) - target).pow(2).mean())
    loss = -_reward(x0).mean() + beta * torch.stack(terms).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])


@pytest.mark.parametrize("spec", ["exact:kl=0.7,kl_steps=3", "alignprop:kl=0.7,kl_steps=3,std=0"])
def test_kl_anchor_adds_beta_times_the_mean_squared_distance_to_the_base_model(spec):
    """Full weights (the base is a frozen copy taken by prepare): the gradient equals autograd of the loss
    written from its definition; at θ = base the anchor's gradient vanishes (the KL's minimum)."""
    net = TinyNet(seed=3)
    rollout = _rollout(net, ddim_scheduler(N))
    method = parse_method(spec)
    method.prepare(net)
    base = method.anchor.base.frozen
    plain = parse_method(spec.split(":")[0] + (":std=0" if "std=0" in spec else ""))
    at_base, _ = _method_grads(method, rollout, seed=5)
    without, _ = _method_grads(plain, rollout, seed=5)
    assert torch.allclose(at_base, without, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(11), dtype=F64))
    grads, report = _method_grads(method, rollout, seed=5)
    if spec.startswith("exact"):
        assert torch.allclose(grads, _kl_reference(rollout, base, 0.7, 3, seed=5), rtol=1e-10, atol=1e-12)
        assert (report.forward_calls, report.vjp_calls) == (2 * N + 2 * 3, N + 3)
    assert not torch.allclose(grads, _method_grads(plain, rollout, seed=5)[0], rtol=1e-4)
    assert report.stats["kl_anchor"] > 0


def test_kl_anchor_draws_the_global_batch_and_cuts_this_process_rows():
    from adjointdpm.finetuning.kl_anchor import KLAnchor

    net = TinyNet()
    whole = _rollout(net, ddim_scheduler(N))
    anchor = KLAnchor(1.0, 2)
    x0 = torch.zeros(B, 3, dtype=F64)
    points, xi = anchor.draw(whole, x0, torch.Generator().manual_seed(1))
    part = Rollout(net, whole.x_T[1:], schedule=whole.schedule, timesteps=whole.timesteps, rows=(1, B, B))
    points_part, xi_part = anchor.draw(part, x0[1:], torch.Generator().manual_seed(1))
    assert points == points_part and len(points) == 2 and torch.equal(xi[:, 1:], xi_part)


# ----------------------------------------------------------------------------------------- truncated
def _truncated_reference(rollout, k):
    """Autograd through the last k steps, the first N − k without a graph."""
    solver = rollout.solver_for()
    cond, uncond = rollout.guided_pair()
    x, hist = rollout.initial_state(), ()
    with torch.no_grad():
        for i in range(N - k):
            x, hist = solver.step(i, x, hist, cond, uncond)
    for i in range(N - k, N):
        x, hist = solver.step(i, x, hist, cond, uncond)
    params = list(rollout.network.parameters())
    return torch.cat([g.flatten() for g in torch.autograd.grad(-_reward(x).mean(), params)])


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_is_the_gradient_through_the_last_k_steps(k):
    net = TinyNet(seed=1)
    rollout = _rollout(net, ddim_scheduler(N))
    grads, report = _method_grads(TruncatedMethod(k=k), rollout)
    assert torch.allclose(grads, _truncated_reference(rollout, k), rtol=1e-10, atol=1e-12)
    assert (report.forward_calls, report.vjp_calls) == report.counted == (N, k)
    full = _reference(rollout, lambda x0: -_reward(x0).mean())
    assert not torch.allclose(grads, full, rtol=1e-3)  # truncation changes the gradient


def test_alignprop_draws_their_schedule_and_truncates_there():
    method = AlignPropMethod()
    gen = torch.Generator().manual_seed(0)
    ks = [method.draw_k(50, gen) for _ in range(3000)]
    assert min(ks) >= 1 and max(ks) <= 49
    assert 7.8 < sum(ks) / len(ks) < 9.2  # 50 − E[int(N(42, 5))] ≈ 8.5
    assert method.draw_k(1, gen) == 1 and method.draw_k(2, gen) == 1
    net = TinyNet(seed=2)
    rollout = _rollout(net, ddim_scheduler(N))
    grads, report = _method_grads(method, rollout, seed=4)
    k = report.stats["k"]
    assert k == method.draw_k(N, torch.Generator().manual_seed(4)) and 1 <= k <= N - 1
    assert torch.allclose(grads, _truncated_reference(rollout, k), rtol=1e-10, atol=1e-12)
    assert (report.forward_calls, report.vjp_calls) == (N, k)


# ------------------------------------------------------------------------------------------ onestep
def test_onestep_is_refl_on_the_one_step_prediction():
    """The reference is diffusers' DDIMScheduler loop to step m, then x̂₀ = (x − σ ε̂)/α with a graph."""
    net = TinyNet(seed=3)
    sched = ddim_scheduler(N)
    rollout = _rollout(net, sched, guidance_scale=1.0, uncond=None)
    method = OneStepMethod(margin=5.0)
    grads, report = _method_grads(method, rollout, seed=2)
    m = report.stats["step"]
    assert m == method.draw_step(N, torch.Generator().manual_seed(2)) and round(0.75 * N) <= m <= N - 1
    x, cond = rollout.x_T, rollout.cond
    with torch.no_grad():
        for t in sched.timesteps[:m]:
            x = sched.step(net(x, t.reshape(1), cond), t, x).prev_sample
    t = sched.timesteps[m]
    abar = sched.alphas_cumprod[int(t)].double()
    x0_hat = (x - (1 - abar).sqrt() * net(x, t.reshape(1), cond)) / abar.sqrt()
    loss = torch.relu(5.0 - _reward(x0_hat)).mean()
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])
    assert torch.allclose(grads, expected, rtol=1e-6, atol=1e-9)  # diffusers' ᾱ table is float32
    assert (report.forward_calls, report.vjp_calls) == report.counted == (m + 1, 1)
    net.zero_grad(set_to_none=True)
    above = OneStepMethod(margin=-100.0).backward(rollout, _reward, torch.Generator().manual_seed(2))
    assert above.loss == 0.0 and float(_grads(net).abs().max()) == 0.0  # ReLU(margin − r): no push above it


# ------------------------------------------------------------------------------------------ adjoint
def test_continuous_adjoint_refuses_stochastic_samplers_and_approximates_exact():
    method = parse_method("adjoint:state=stored")
    for solver, eta in (("ddpm", 0.0), ("ddim", 0.5), ("euler_ancestral", 0.0)):
        with pytest.raises(MethodError, match="deterministic"):
            method.check_sampler(solver, eta)
    method.check_sampler("dpmpp2m")
    net = TinyNet(seed=5)
    steps = 40
    sched = ddim_scheduler(steps)
    rollout = _rollout(net, sched)
    with pytest.raises(MethodError):
        method.backward(_rollout(net, ddpm_scheduler(N), solver="ddpm"), _reward, torch.Generator())
    grads, report = _method_grads(method, rollout)
    exact = _reference(rollout, lambda x0: -_reward(x0).mean())
    assert torch.isfinite(grads).all() and cosine(grads, exact) > 0.95
    assert (report.forward_calls, report.vjp_calls) == report.counted
    assert report.forward_calls >= steps and report.vjp_calls >= steps - 1


# --------------------------------------------------------------------------------- adjoint matching
def test_adjoint_matching_counts_and_touches_only_the_trainable_weights():
    net = TinyNet(seed=6)
    sched = ddpm_scheduler(N)
    method = AdjointMatchingMethod(reward_scale=2.0, steps=2)
    method.prepare(net)
    rollout = _rollout(net, sched)
    net.inp.weight.requires_grad_(False)
    base = method.base.frozen
    net.calls = net.vjps = base.calls = base.vjps = 0
    grads_report = method.backward(rollout, _reward, torch.Generator().manual_seed(3))
    assert net.inp.weight.grad is None and net.out.weight.grad is not None
    picked = grads_report.stats["steps"]
    lowest = min(picked) + 1  # the lowest adjoint needed is ã_{k+1}
    sampling, adjoint, loss = N, N - lowest, len(picked)
    below = sum(1 for k in picked if k < lowest)  # μ_base without a VJP there
    assert (net.calls, net.vjps) == (sampling + loss, loss)  # the current model: sampling and the loss
    assert (base.calls, base.vjps) == (adjoint + below, adjoint)  # the frozen base: the lean adjoint
    assert (grads_report.forward_calls, grads_report.vjp_calls) == (net.calls + base.calls, net.vjps + base.vjps)
    assert 0.0 < grads_report.stats["kept"] <= 1.0


def test_adjoint_matching_outlier_rule_is_the_reference_ema():
    method = AdjointMatchingMethod()
    assert [method._ema_update(v) for v in (1.0, 2.0, 3.0)] == pytest.approx([1.0, 1.5, 0.9 * 1.5 + 0.1 * 3.0])
    state = method.state_dict()
    other = AdjointMatchingMethod()
    other.load_state_dict(state)
    assert other._ema_update(4.0) == pytest.approx(method._ema_update(4.0))
    net = TinyNet(seed=7)
    am = AdjointMatchingMethod(reward_scale=1.0, steps=4)
    am.prepare(net)
    with torch.no_grad():
        net.out.bias.add_(0.3)  # θ ≠ base: the residuals differ from trajectory to trajectory
    x = torch.randn(100, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    sched = ddpm_scheduler(8)
    report = am.backward(Rollout(net, x, schedule=sched, timesteps=sched.timesteps), _reward, torch.Generator().manual_seed(0))
    assert report.stats["kept"] == pytest.approx(0.9, abs=0.005)  # the first threshold: the batch's 90th percentile
    assert report.stats["threshold"] == am.ema_value and am.ema_updates == 1


def test_adjoint_matching_with_a_diffusers_unet_and_lora_adapters():
    peft = pytest.importorskip("peft")
    from conftest import SD_BETAS, tiny_conditional_unet
    from diffusers import DDPMScheduler
    from adjointdpm.finetuning import BaseModel

    unet = tiny_conditional_unet()
    plain = tiny_conditional_unet()
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    assert BaseModel(unet).kind == "adapter-layers"
    sched = DDPMScheduler(**SD_BETAS, clip_sample=False)
    sched.set_timesteps(3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 8, 8, dtype=F64, generator=gen)
    cond, uncond = torch.randn(2, 3, 8, dtype=F64, generator=gen), torch.randn(1, 3, 8, dtype=F64, generator=gen)
    t = torch.tensor([500.0], dtype=F64)
    with torch.no_grad(), BaseModel(unet)() as base:
        assert torch.allclose(base(x, t, cond).sample, plain(x, t, cond).sample, atol=1e-12)
    method = parse_method("adjoint-matching", reward_scale=10.0)
    method.prepare(unet)
    rollout = Rollout(unet, x, schedule=sched, timesteps=sched.timesteps, cond=cond, uncond=uncond, guidance_scale=3.0)
    report = method.backward(rollout, lambda y: y.mean((1, 2, 3)), gen)
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    assert lora and all(p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)
    assert report.forward_calls > 0 and report.vjp_calls > 0


def test_kl_anchor_on_lora_adapters_reads_the_base_with_the_adapters_off():
    """LoRA adapters in a diffusers UNet: gradient(kl=β) = gradient(kl=0) + β·∇A with A written by hand, the
    base model being the same UNet with diffusers' disable_adapters(); the adapters' flags are restored."""
    peft = pytest.importorskip("peft")
    from conftest import SD_BETAS, tiny_conditional_unet
    from diffusers import DDIMScheduler

    unet = tiny_conditional_unet()
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False)
    sched.set_timesteps(3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 8, 8, dtype=F64, generator=gen)
    cond, uncond = torch.randn(2, 3, 8, dtype=F64, generator=gen), torch.randn(1, 3, 8, dtype=F64, generator=gen)
    rollout = Rollout(unet, x, schedule=sched, timesteps=sched.timesteps, cond=cond, uncond=uncond, guidance_scale=3.0)

    def reward(y):
        return y.mean((1, 2, 3))

    def grads(spec):
        method = parse_method(spec)
        method.prepare(unet)
        for p in lora:
            p.grad = None
        report = method.backward(rollout, reward, torch.Generator().manual_seed(4))
        assert all(p.requires_grad for p in lora)
        return torch.cat([p.grad.flatten() for p in lora]), report

    with_anchor, report = grads("alignprop:std=0,kl=0.5,kl_steps=2")
    without, _ = grads("alignprop:std=0")
    gen = torch.Generator().manual_seed(4)
    torch.randn((), generator=gen, dtype=torch.float64)  # AlignProp's draw of the truncation
    points = sorted(int(i) for i in torch.randperm(3, generator=gen)[:2])
    xi = torch.randn((2, *x.shape), generator=gen, dtype=F64)
    with torch.no_grad():
        x0 = adpm.sample(unet, x, grad=None, **rollout.sample_kwargs())
    terms = []
    for j, i in enumerate(points):
        t = sched.timesteps[i]
        abar = sched.alphas_cumprod[int(t)].to(F64)
        x_i = abar.sqrt() * x0 + (1 - abar).sqrt() * xi[j]
        unet.disable_adapters()
        with torch.no_grad():
            target = unet(x_i, t, cond).sample
        unet.enable_adapters()
        terms.append((unet(x_i, t, cond).sample - target).pow(2).mean())
    by_hand = torch.cat([g.flatten() for g in torch.autograd.grad(torch.stack(terms).mean(), lora)])
    assert torch.allclose(with_anchor, without + 0.5 * by_hand, rtol=1e-9, atol=1e-12)
    assert by_hand.norm() > 1e-3 * without.norm() and report.stats["kl_anchor"] > 0


# ------------------------------------------------------------------------- a short fine-tune, each
@pytest.mark.parametrize("spec", ["exact", "truncated:k=2", "alignprop", "onestep", "adjoint", "adjoint-matching"])
def test_a_short_fine_tune_raises_the_reward(spec):
    sched, model = gaussian_problem(False, 8)
    a = torch.tensor([1.0, -0.5], dtype=F64)
    reward = linear_reward(a)
    method = parse_method(spec, reward_scale=1.0)
    assert isinstance(method, Method)
    method.check_sampler("ddim")
    method.prepare(model)

    def mean_reward():
        x = torch.randn(2000, 2, dtype=F64, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            return float(reward(adpm.sample(model, x, schedule=sched, timesteps=sched.timesteps, solver="ddim", grad=None)).mean())

    before = mean_reward()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        x = torch.randn(64, 2, dtype=F64, generator=gen)
        opt.zero_grad()
        report = method.backward(Rollout(model, x, schedule=sched, timesteps=sched.timesteps, solver="ddim"), reward, gen)
        assert torch.isfinite(torch.tensor(report.loss))
        opt.step()
    assert mean_reward() > before + 0.1, spec


# ------------------------------------------------------------------------------------ the parser
def test_parse_method_reads_every_method_and_its_spec_back():
    for spec in ("exact", "exact:memory=8GiB", "truncated:k=3", "alignprop:mean=0.8,std=0.05", "onestep:margin=1.5",
                 "adjoint:state=stored,steps=5,solver=euler", "adjoint-matching:reward_scale=100,pairing=current,quantile=off",
                 "alignprop:kl=0.1", "exact:kl=0.5,kl_steps=3", "truncated:k=2,kl=1"):
        method = parse_method(spec)
        assert parse_method(method.spec).spec == method.spec
    assert set(METHODS) == {"exact", "truncated", "alignprop", "onestep", "adjoint", "adjoint-matching"}
    assert parse_method("adjoint-matching", reward_scale=50.0).reward_scale == 50.0
    assert parse_method("adjoint-matching:reward_scale=3", reward_scale=50.0).reward_scale == 3.0
    assert parse_method("truncated:k=2", reward_scale=50.0).k == 2  # defaults apply only where an option exists


@pytest.mark.parametrize("spec, words", [
    ("", "no fine-tuning method"), ("draft", "unknown fine-tuning method"), ("truncated:k=0", "k must be"),
    ("truncated:depth=2", "no option 'depth'"), ("truncated:k", "needs a value"), ("truncated:k=1,k=2", "twice"),
    ("exact:memory=lots", "not a size"), ("alignprop:mean=2", "mean must"), ("adjoint:state=magic", "state must"),
    ("adjoint-matching:reward_scale=0", "λ must be a number > 0"), ("adjoint-matching:reward_scale=-1", "> 0"),
    ("adjoint-matching:pairing=later", "pairing"), ("adjoint-matching:quantile=2", "quantile"),
    ("alignprop:kl=-1", "kl .* must be a number ≥ 0"), ("exact:kl=0.1,kl_steps=0", "kl_steps"),
    ("onestep:kl=0.1", "no option 'kl'"),
])
def test_parse_method_refuses_bad_specs_in_one_line(spec, words):
    with pytest.raises(MethodError, match=words) as err:
        parse_method(spec)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_bad_rewards_and_models_are_method_errors():
    net = TinyNet()
    rollout = _rollout(net, ddim_scheduler(3))
    gen = torch.Generator()
    with pytest.raises(MethodError, match="one value per sample"):
        ExactMethod().backward(rollout, lambda x: x.sum(), gen)
    with pytest.raises(MethodError, match="no gradient"):
        TruncatedMethod(1).backward(rollout, lambda x: x.detach().sum(1), gen)
    with pytest.raises(MethodError, match="prepare"):
        AdjointMatchingMethod().backward(_rollout(net, ddpm_scheduler(3)), _reward, gen)
    net.requires_grad_(False)
    with pytest.raises(MethodError, match="requires_grad"):
        OneStepMethod().backward(rollout, _reward, gen)


@pytest.mark.parametrize("spec", ["exact", "onestep:margin=100", "adjoint-matching"])
def test_a_stochastic_rollout_without_noise_is_reproducible_from_the_generator(spec):
    """Noises not given are drawn from the method's generator: same generator state, same gradient."""
    net = TinyNet(seed=8)
    method = parse_method(spec)
    method.prepare(net)
    rollout = _rollout(net, ddpm_scheduler(N), solver="ddpm")
    first, _ = _method_grads(method, rollout, seed=5)
    again, _ = _method_grads(method, rollout, seed=5)
    other, _ = _method_grads(method, rollout, seed=6)
    assert torch.equal(first, again) and not torch.allclose(first, other)
