"""The exact gradient modes under their contract (``_contracts.GradModeContract``): exact and checkpoint equal
float64 back-propagation, exact and back-propagation equal finite differences; weight subsets, existing
.grad, LoRA adapters, torch.autograd.grad and non-leaf conditioning."""

import torch

import adjointdpm as adpm
from _contracts import (SCHEDULE, TIMESTEPS, FiniteDifferenceContract, GradModeContract,  # noqa: F401
                        assert_same_gradients, pytest_generate_tests, unet_gradients)
from _stochastic_cases import GRAD_CASES, stochastic_problem
from conftest import tiny_conditional_unet


class TestExact(GradModeContract, FiniteDifferenceContract):
    """The exact adjoint equals back-propagation (every solver: its solver contract; here the other prediction
    types without guidance) and finite differences."""

    MODE = "exact"
    CASES = (("dpmpp2m", 1.0, "v_prediction"), ("dpmpp2m", 1.0, "sample"))
    FD_CASES = ("dpmpp2m",)


class TestBackprop(FiniteDifferenceContract):
    MODE = "backprop"
    FD_CASES = ("dpmpp2m",)


class TestCheckpoint(GradModeContract):
    """Checkpointing recomputes the same operations: back-propagation's gradient on every solver, the
    stochastic ones' injected noises included."""

    MODE = "checkpoint"
    CASES = ("ddim", "dpmpp2m", "heun", *(f"stochastic {case}" for case in GRAD_CASES))

    def problem(self, case):
        if case.startswith("stochastic "):
            return stochastic_problem(case.split(" ", 1)[1])
        return super().problem(case)


def test_weight_subset_and_existing_grads(unet, inputs):
    """Only parameters with requires_grad are differentiated; gradients add to existing .grad."""
    for name, p in unet.named_parameters():
        p.requires_grad_("up_blocks" in name)
    ref = unet_gradients(unet, inputs, "backprop", "ddim")
    assert ref["weights"] and all("up_blocks" in n for n in ref["weights"])
    got = unet_gradients(unet, inputs, "exact", "ddim")
    assert_same_gradients(got, ref, rtol=1e-8)
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
    ref = unet_gradients(unet, inputs, "backprop", "dpmpp2m")
    assert ref["weights"] and all("lora" in n for n in ref["weights"])
    assert_same_gradients(unet_gradients(unet, inputs, "exact", "dpmpp2m"), ref, rtol=1e-8)


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


def test_every_gradient_mode_is_under_its_contract():
    from test_adjoint import TestAdjoint, TestTruncated
    from test_reversible import TestReversible

    from adjointdpm.gradients import GRAD_MODES, resolve_grad_mode

    contracts = (TestExact, TestBackprop, TestCheckpoint, TestAdjoint, TestTruncated, TestReversible)
    assert {resolve_grad_mode(c.MODE).name for c in contracts} == set(GRAD_MODES)
    assert all(issubclass(c, GradModeContract) for c in contracts if c is not TestBackprop)
