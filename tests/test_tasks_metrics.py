"""Objectives, metrics and baselines of the applications, on a tiny random-weight pixel model.

Includes the three bugs of the original attack code (aliased projection centre, cross-entropy on
probabilities, evaluation of the wrong tensor) as regression tests, and the one-step baseline's
gradient against a hand computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adjointdpm.apps import audit, guide
from adjointdpm.apps.baselines import OneStep, grad_label
from adjointdpm.apps.choose import model_critics
from adjointdpm.apps.baselines import resolve_grad as parse_grad
from adjointdpm.apps.errors import UserInputError
from adjointdpm.apps.image_files import read_image
from adjointdpm.apps.invert import apply_effect
from adjointdpm.apps.loop import LoopConfig, run
from adjointdpm.apps.metrics import psnr
from adjointdpm.apps.optimizers import NormalizedSteps
from adjointdpm.apps.options import EngineOptions
from adjointdpm.apps.session import Session
from adjointdpm.apps.stylize import reference_image
from adjointdpm.critics.morphology import outline
from adjointdpm.embedded.digit_objectives import StyleLoss, outline_reference
from test_tasks_fixtures import build_tiny_pixel_model


@pytest.fixture(scope="module")
def pix(tmp_path_factory):
    return build_tiny_pixel_model(tmp_path_factory.mktemp("pix"))


def session(pix, grad="adjoint", **kw):
    return Session(EngineOptions(model=str(pix), grad=grad, **kw))


# the digits model's tasks at the settings these tests were written for (AdamW, 4 views without noise)
OLD_GUIDE = dict(optimizer="adamw", lr=0.05, views=4, view_noise=0.0, stop_loss=0.0)


def guide_task(s, seed=0, **options):
    return guide.build(s, guide.Options(target_class="8", **{**OLD_GUIDE, **options}), seed=seed)


def audit_task(s, seed, **options):
    return audit.build(s, audit.Options(**{"eps": 0.5, "step_size": 0.1, **options}), seed=seed)


# ----------------------------------------------------------------------------------- grad specs
def test_parse_grad():
    assert grad_label(parse_grad("adjoint")) == "adjoint"
    assert grad_label(parse_grad("adjoint-stored")) == "adjoint(state=stored)"
    assert grad_label(parse_grad("adjoint:steps=5")) == "adjoint(steps=5)"
    assert grad_label(parse_grad("truncated")) == "truncated(k=1)"
    assert grad_label(parse_grad("truncated:k=2")) == "truncated(k=2)"
    assert isinstance(parse_grad("onestep"), OneStep)
    for bad in ("adjoin", "truncated:k=0", "adjoint:steps", "adjoint:foo=1"):
        with pytest.raises(UserInputError):
            parse_grad(bad)


# ------------------------------------------------------------------------------------ one-step
def _guide_grad(pix, grad, steps):
    s = session(pix, grad=grad, steps=steps, guidance_scale=1.0)
    task = guide_task(s, seed=3, n=2)
    task.setup()
    loss, _ = task.compute_loss(0, torch.Generator())
    if loss.requires_grad:
        loss.backward()
    return task, task.x.grad.clone()


def test_onestep_equals_exact_for_one_step(pix):
    """With one sampling step the one-step estimate IS the sample: the baseline's gradient is exact."""
    _, g1 = _guide_grad(pix, "onestep", 1)
    _, g2 = _guide_grad(pix, "exact", 1)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_onestep_gradient_is_the_mean_of_per_step_gradients(pix):
    task, g = _guide_grad(pix, "onestep", 3)
    s = task.session
    from adjointdpm.model import Denoiser
    from adjointdpm.solvers import TimeGrid, make_solver

    den = Denoiser(s.network, s.schedule, s.comps.prediction_type, 1.0, {})
    grid = TimeGrid.from_timesteps(s.schedule, s.timesteps())
    solver = make_solver(s.solver, den, grid)
    x = task.x.detach()
    expected = torch.zeros_like(x)
    hist = ()
    for i in range(3):
        leaf = x.clone().requires_grad_(True)
        _, x0 = den.eps_and_x0(leaf, float(grid.t[i]), task.cond, None)
        (gi,) = torch.autograd.grad(task.objective(x0).mean(), leaf)
        expected += float(grid.alpha[i] / grid.alpha[0]) * gi / 3
        with torch.no_grad():
            x, hist = solver.step(i, x, hist, task.cond, None)
    torch.testing.assert_close(g, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))
    _, g_exact = _guide_grad(pix, "exact", 3)
    assert not torch.allclose(g, g_exact, rtol=1e-2)  # it is a different (biased) estimate


# ---------------------------------------------------------------------------------------- guide
def test_guide_renormalises_to_the_gaussian_shell(pix, tmp_path):
    task = guide_task(session(pix), seed=0, n=3, lr=0.5)
    run(task, LoopConfig(out=tmp_path, iters=2, progress=False))
    d = task.x[0].numel()
    torch.testing.assert_close(task.x.detach().flatten(1).norm(dim=1), torch.full((3,), d ** 0.5))
    task2 = guide_task(session(pix), seed=0, n=3, lr=0.5, renorm=False)
    run(task2, LoopConfig(out=tmp_path / "b", iters=2, progress=False))
    assert not torch.allclose(task2.x.detach().flatten(1).norm(dim=1), torch.full((3,), d ** 0.5))


def test_guide_intermediate_state_and_cond(pix, tmp_path):
    s = session(pix)
    task = guide_task(s, seed=0, n=2, start_step=2, optimize_cond=True)
    summary = run(task, LoopConfig(out=tmp_path, iters=2, progress=False))
    assert summary["settings"]["start_step"] == 2 and task.cond.grad is not None
    assert not torch.equal(task.cond.detach(), task.cond0)
    assert "fresh_noise_judge_accuracy" in summary["after"]
    with pytest.raises(UserInputError, match="--start-step"):
        guide_task(s, seed=0, start_step=4)  # the model's default is 4 steps: 0..3


# ---------------------------------------------------------------------------------------- audit
def test_audit_projection_centre_is_the_untouched_original(pix, tmp_path):
    s = session(pix)
    task = audit_task(s, 4, n=6, eps=0.05, step_size=1.0)
    run(task, LoopConfig(out=tmp_path, iters=3, progress=False))
    original = s.noise(6, 4)
    assert torch.equal(task.x_orig, original)  # not aliased to the optimised tensor
    linf = (task.x.detach() - original).abs().flatten(1).max(1).values
    assert float(linf.max()) <= 0.05 + 1e-6
    moved = ~task.done | task.succeeded  # attacked samples moved up to the budget
    assert float(linf[task.valid].max()) > 0.04
    assert torch.equal(task.x.detach()[~task.valid], original[~task.valid])  # samples left out never move
    assert moved.any()


def test_audit_cross_entropy_is_on_logits(pix):
    s = session(pix)
    task = audit_task(s, 4, n=6)
    task.setup()
    x0 = s.sample(task.x.detach(), task.cond, grad=None)
    logits = model_critics(s).guide(s.decode(x0))
    expected = -F.cross_entropy(logits, task.label, reduction="none")
    torch.testing.assert_close(task.objective(x0), expected)
    on_probs = -F.cross_entropy(logits.softmax(-1), task.label, reduction="none")
    assert not torch.allclose(task.objective(x0), on_probs)


def test_audit_evaluates_the_attacked_images(pix, tmp_path):
    s = session(pix)
    task = audit_task(s, 4, n=6, eps=0.3, step_size=0.3)
    summary = run(task, LoopConfig(out=tmp_path, iters=3, progress=False))
    images = s.generate(task.x.detach(), task.cond)  # regenerate from the final (attacked) noises
    c = model_critics(s)
    success = (c.guide(images).argmax(-1) != task.label) & (c.judge(images).argmax(-1) == task.label) & task.valid
    assert summary["after"]["success_rate"] == pytest.approx(float(success.sum()) / float(task.valid.sum()))
    from PIL import Image
    import numpy as np

    png = np.asarray(Image.open(tmp_path / "after" / "000.png"), dtype=np.float32) / 127.5 - 1
    assert np.abs(png - images[0, 0].clamp(-1, 1).numpy()).max() <= 1 / 127.5 + 1e-6  # after/ shows them


def test_audit_attacks_the_injected_noises_within_the_budget(pix, tmp_path):
    """--optimize-noises with a stochastic solver: every injected noise stays within ε of its untouched
    seeded stream, attacked samples' noises move, samples left out never do, and the success rate is the
    attacked images' re-sampled from the final (x_T, noises)."""
    import adjointdpm as adpm

    s = session(pix, grad="exact", solver="ddpm")
    task = audit_task(s, 4, n=6, eps=0.3, step_size=0.3, optimize_noises=True)
    summary = run(task, LoopConfig(out=tmp_path, iters=3, progress=False))
    streams = adpm.noise_tensor(s.noise_streams(range(6), 4).seed, s.steps, task.x).transpose(0, 1)
    assert torch.equal(task.original_noise, streams)  # the centre: the noises sampled without the option
    moved = (task.noise.detach() - streams).flatten(1).abs().max(1).values
    assert float(moved.max()) <= 0.3 + 1e-6 and summary["after"]["noise_linf_max"] == pytest.approx(float(moved.max()))
    assert float(moved[task.valid].max()) > 0.1
    assert not task.valid.all() and float(moved[~task.valid].max()) == 0.0  # samples left out never move
    images = s.generate(task.x.detach(), task.cond, noise=task.noise.detach().transpose(0, 1))
    c = model_critics(s)
    success = (c.guide(images).argmax(-1) != task.label) & (c.judge(images).argmax(-1) == task.label) & task.valid
    assert summary["after"]["success_rate"] == pytest.approx(float(success.sum()) / float(task.valid.sum()))


def test_a_samples_injected_noises_do_not_depend_on_its_batch(pix):
    """Seeded streams are per sample: a subset of rows, or smaller generation batches, give each sample
    the images it gets in the whole batch."""
    s = session(pix, grad="exact", solver="euler_ancestral")
    x = s.noise(5, 1)
    cond = s.encode(["a handwritten digit three"])
    whole = s.generate(x, cond)
    close = dict(rtol=0, atol=1e-5)  # (a network batch of another size rounds differently)
    torch.testing.assert_close(s.generate(x, cond, batch_size=2), whole, **close)
    rows = torch.tensor([1, 4])
    torch.testing.assert_close(s.generate(x[rows], cond, noise=s.noise_streams(rows)), whole[rows], **close)
    other = s.generate(x[rows], cond)  # rows 0, 1 of the call: the streams of samples 0 and 1
    assert (other - whole[rows]).abs().max() > 1e-2


def test_normalized_steps():
    x = torch.zeros(3, 2, 2, requires_grad=True)
    opt = NormalizedSteps([x], lr=0.5)
    x.grad = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]])
    opt.step()
    assert torch.equal(x[1], torch.zeros(2, 2))  # zero gradient: no move (frozen samples stay)
    rms = x.detach().flatten(1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms[[0, 2]], torch.tensor([0.5, 0.5]))


# ------------------------------------------------------------------------------ images, effects
def test_effects_and_psnr():
    img = -torch.ones(1, 1, 9, 9)
    img[..., 3:6, 3:6] = 1.0
    thick = apply_effect(img, "thicken")
    assert (thick > 0).sum() == 25 and (img > 0).sum() == 9
    hollow = apply_effect(img, "outline")
    assert hollow[0, 0, 4, 4] == -1 and hollow[0, 0, 2, 4] == 1  # inside empty, border inked
    shifted = apply_effect(img, "shift")
    assert torch.equal(shifted[..., 4:7, 5:8], img[..., 3:6, 3:6])
    assert float(psnr(img, img)) > 90
    noisy = img + 0.2
    torch.testing.assert_close(psnr(noisy.clamp(-1, 1), img), 10 * torch.log10(4 / ((noisy.clamp(-1, 1) - img) ** 2).mean()).view(1))


def test_style_loss_vanishes_on_the_reference(pix):
    s = session(pix)
    ref = reference_image("outline", (1, 16, 16), {"outline": outline_reference})
    style = StyleLoss(model_critics(s).guide, ref)
    assert float(style(ref)) == pytest.approx(0.0, abs=1e-10)
    assert float(style(-ref)) > 1e-3
    assert float(outline(ref).max()) <= 1 and reference_image("skimage:brick", (3, 16, 16)).shape == (1, 3, 16, 16)


def test_read_image_rejects_wrong_size_and_mode(tmp_path):
    from PIL import Image

    Image.new("L", (16, 16)).save(tmp_path / "ok.png")
    Image.new("L", (20, 16)).save(tmp_path / "big.png")
    Image.new("CMYK", (16, 16)).save(tmp_path / "cmyk.jpg")
    (tmp_path / "junk.png").write_text("not an image")
    assert read_image(tmp_path / "ok.png", 1, (16, 16), what="t").shape == (1, 1, 16, 16)
    with pytest.raises(UserInputError, match="is 20x16; this model makes 16x16"):
        read_image(tmp_path / "big.png", 1, (16, 16), what="target image")
    assert read_image(tmp_path / "big.png", 3, (16, 16), what="r", resize=True).shape == (1, 3, 16, 16)
    with pytest.raises(UserInputError, match="mode CMYK"):
        read_image(tmp_path / "cmyk.jpg", 1, (16, 16), what="t")
    with pytest.raises(UserInputError, match="not a readable image"):
        read_image(tmp_path / "junk.png", 1, (16, 16), what="t")


def test_prompt_longer_than_the_tokenizer_limit(pix):
    s = session(pix)
    with pytest.raises(UserInputError, match="tokens long; this model's tokenizer takes at most 16"):
        s.check_prompt("a handwritten digit " * 6)
