"""The off-manifold measures of :mod:`adjointdpm.apps.manifold`: the noise typicality statistic (white noise
is typical, a speckled or band-concentrated noise of the same norm is not; its penalty's gradient matches
finite differences in float64), and the base model's denoising-error flag: on the embedded digits model it
fires on a speckled image and not on the model's own samples; on tiny SD and Flux folders (random weights) it
runs on the family's latents (packed for Flux), plain samples are not flagged and the noise flag fires on a
speckled noise."""
from __future__ import annotations

import pytest
import torch

from adjointdpm.apps import manifold as M

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _speckle(noise: torch.Tensor) -> torch.Tensor:
    """The same noise with about half of its energy moved into a checkerboard (the highest frequency),
    renormalised to the original norm: DOODL's renormalisation cannot see it."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in noise.shape[1:]], indexing="ij")).sum(0)
    board = (idx % 2 * 2 - 1).to(noise)
    mixed = noise + 1.0 * board
    return mixed * (noise.flatten(1).norm(dim=1) / mixed.flatten(1).norm(dim=1)).view(-1, *[1] * (noise.dim() - 1))


@pytest.mark.parametrize("shape", [(64, 4, 16, 16), (64, 1, 16, 16), (64, 64, 16)])
def test_white_noise_is_typical_and_a_speckled_one_is_not(shape):
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z = M.typicality_z(noise)
    assert z.shape == (shape[0],)
    assert z.abs().max() < 5 and abs(float(z.mean())) < 1
    speckled = _speckle(noise)
    assert torch.allclose(speckled.flatten(1).norm(dim=1), noise.flatten(1).norm(dim=1), rtol=1e-5)
    assert M.typicality_z(speckled).min() > 8


def test_noise_with_its_energy_in_one_block_is_atypical():
    noise = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    moved = noise.clone()
    moved[..., :4, :4] *= 2.5
    moved *= (noise.flatten(1).norm(dim=1) / moved.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    assert M.typicality_z(moved).min() > 8 > M.typicality_z(noise).max()


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (2, 6, 3)])
def test_typicality_penalty_gradient_matches_finite_differences(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: M.typicality_penalty(t, bands=2, blocks=2), (x,))


def test_calibration_states_its_false_positive_rate():
    errors = torch.cat([torch.zeros(98), torch.tensor([10.0, 20.0])]) + torch.linspace(-1, 1, 100)
    cal = M.ManifoldCalibration.from_errors(errors, threshold=3.0)
    assert cal.false_positive_rate == pytest.approx(0.02)
    assert cal.describe()["plain_samples"] == 100
    assert bool((cal.z(errors) > 3).sum() == 2)


def test_denoising_error_flags_a_speckled_digit_and_not_the_models_own():
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    s = Session(EngineOptions())  # the embedded model as guide samples it (20 steps)
    sampler = M.base_sampler(s.network, s.schedule, s.timesteps(0), s.comps.prediction_type)
    cond = s.encode(["a handwritten digit three"])
    with torch.no_grad():
        plain = s.sample(s.noise(32, 0), cond)
        fresh = s.sample(s.noise(16, 1), cond)
    check = M.ManifoldCheck.calibrated(sampler, cond, plain, threshold=M.THRESHOLD)
    z, flags = check.flags(fresh)
    # the model's own samples have a tail (about 1 % of them above the default threshold on this model)
    assert flags.sum() <= 1 and float(z.median()) < 1.5, z
    g = torch.Generator().manual_seed(3)
    dots = torch.rand(fresh.shape, generator=g) < 0.5  # salt and pepper: half the pixels set to ±1
    speckled = torch.where(dots, torch.randint(0, 2, fresh.shape, generator=g).to(fresh) * 2 - 1, fresh)
    z_s, flags_s = check.flags(speckled)
    assert flags_s.all() and z_s.min() > z.median() + 4, z_s
    # the one call a fine-tuning evaluation makes
    z2, flags2 = M.flag_images(sampler, speckled, cond, calibration=check.calibration)
    assert torch.equal(flags2, flags_s) and torch.allclose(z2, z_s.float())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from _tiny_families import build_tiny_flux
    from _tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("manifold")
    return {"sd": build_tiny_sd(root / "sd"), "flux": build_tiny_flux(root / "flux")}


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_flags_on_tiny_families(folders, family):
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    s = Session(EngineOptions(model=folders[family], steps=4))
    sampler = M.base_sampler(s.network, s.schedule, s.timesteps(0), s.comps.prediction_type)
    cond = s.encode(["a photo"])
    with torch.no_grad():
        plain = s.sample(s.noise(24, 0), cond)
        fresh = s.sample(s.noise(8, 1), cond)
    check = M.ManifoldCheck.calibrated(sampler, cond, plain, threshold=M.THRESHOLD)
    z, flags = check.flags(fresh)
    assert z.shape == (8,) and torch.isfinite(z).all() and not flags.any(), z
    noise = s.noise(8, 2)
    assert M.typicality_z(noise).abs().max() < 5
    assert M.noise_flags(_speckle(noise)).all() and not M.noise_flags(noise).any()
    # the denoising error is differentiable in the latents (guide's prior)
    x = fresh[:2].clone().requires_grad_(True)
    check.z(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
