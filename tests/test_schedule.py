"""Schedules: VP identities, exact inverses at fractional times, agreement with diffusers."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import adjointdpm as adpm
from conftest import SD_BETAS


@pytest.fixture(params=["discrete", "linear", "cosine"])
def schedule(request):
    if request.param == "discrete":
        return adpm.VPSchedule.from_scheduler(DDPMScheduler(**SD_BETAS))
    if request.param == "linear":
        return adpm.VPSchedule.linear()
    return adpm.VPSchedule.cosine()


def test_vp_identities(schedule):
    t = np.linspace(schedule.t_min, schedule.t_max, 257)
    a, s, lam, rho = schedule.alpha(t), schedule.sigma(t), schedule.lambda_(t), schedule.rho(t)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(rho, s / a, rtol=1e-12)
    np.testing.assert_allclose(lam, np.log(a / s), rtol=1e-10, atol=1e-12)
    assert np.all(np.diff(lam) < 0), "λ must decrease with t"


def test_inverse_at_fractional_times(schedule):
    # random, non-grid times: the inverse must not snap to training indices
    t = np.sort(np.random.default_rng(0).uniform(schedule.t_min, schedule.t_max, 100))
    assert np.any(np.abs(t - np.round(t)) > 0.1)
    np.testing.assert_allclose(schedule.t_from_lambda(schedule.lambda_(t)), t, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(schedule.t_from_rho(schedule.rho(t)), t, rtol=1e-9, atol=1e-9)


def test_discrete_matches_alphas_cumprod_at_indices():
    sched = DDPMScheduler(**SD_BETAS)
    s = adpm.VPSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    n = np.arange(1000)
    np.testing.assert_allclose(s.alpha(n) ** 2, sched.alphas_cumprod.double().numpy(), rtol=1e-6)
    betas = adpm.VPSchedule.from_betas(sched.betas)
    np.testing.assert_allclose(betas.alpha(n), s.alpha(n), rtol=1e-6)
    # fractional time lies strictly between its neighbours (log α interpolated linearly)
    assert s.alpha(10.0) > s.alpha(10.5) > s.alpha(11.0)
    np.testing.assert_allclose(np.log(s.alpha(10.5)), 0.5 * (np.log(s.alpha(10.0)) + np.log(s.alpha(11.0))))


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="strictly decreasing"):
        adpm.VPSchedule.from_alphas_cumprod(torch.tensor([0.5, 0.6, 0.7]))
    with pytest.raises(ValueError, match="between 0 and 1"):
        adpm.VPSchedule.from_alphas_cumprod(torch.tensor([1.0, 0.5]))
    with pytest.raises(TypeError, match="alphas_cumprod"):
        adpm.VPSchedule.from_scheduler(object())
    with pytest.raises(ValueError, match="ρ > 0"):
        adpm.VPSchedule.linear().t_from_rho(0.0)
