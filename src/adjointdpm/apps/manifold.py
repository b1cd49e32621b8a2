"""Is a sample still on the model's data manifold? Two generic measures (no knowledge of the images' content)
and the flag built from them.

**Noise typicality** (of an initial noise x_T, or any tensor that should be N(0, I)). The coefficients of an
orthonormal transform of white Gaussian noise are again i.i.d. N(0, 1); we use the orthonormal 2-D DCT of each
channel (4-D latents (B, C, H, W)) and split the coefficients into groups g: ``bands`` radial frequency bands
(u/H + v/W in equal steps, the whole image) and ``blocks``² spatial blocks of the untransformed noise (each
channel separately). Under the null each group's energy S_g = Σ_{i∈g} c_i² is χ²(n_g), so

    z_g = (S_g − n_g) / √(2 n_g)                       ≈ N(0, 1),
    T(x) = (1/G) Σ_g z_g²                                ≈ 1 under the null (χ²(G)/G),

and ``typicality_z(x) = (G·T − G) / √(2G)`` is its z-score. ReNO's norm regulariser is the one-group case
(S = |x|², n = D); a noise can keep |x| = √D (DOODL's renormalisation) while piling its energy into one band
or one corner, which the groups see. Other shapes are read as one-channel images: a packed sequence
(B, L, C) as an L × C image, a flat vector as one row. ``typicality_penalty`` (T, differentiable) is the prior
guide adds to its loss.

**Denoising error** (of a clean latent x_0, any family). Re-noise the sample to a few grid points i of the
sampler (fixed seeds: the same ε_k for every sample), x_i = α_i x_0 + σ_i ε_k, let the base model predict
x̂₀(x_i), and average e(x_0) = (1/K) Σ_k log mean((x̂₀ − x_0)²). A sample the model would have produced is
denoised back to itself up to the usual error; an adversarial speckle is not (the model never saw it).
``ManifoldCalibration`` measures e on the model's own plain samples and turns e into a z-score
z = (e − median) / (1.4826 · MAD) (robust mean and standard deviation of the plain samples).

**The flag.** ``off_manifold(z) = z > threshold`` (default 6.0; a non-finite z is flagged too; the fraction of
plain samples flagged is the calibration's false-positive rate, written next to it). :func:`flag_images` is the one call a fine-tuning
evaluation makes on its images: ``flag_images(sampler, latents, cond, uncond, calibration)`` → (z, flags);
``base_sampler`` is the sampler it reads the model through (DDIM on the run's grid, no guidance) and
``flag_captions`` the per-image captions of comparison.png ("z 1.3", "z 9.1 OFF").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: grid points (fractions of the way from the first step to the last) where a sample is re-noised
LEVELS = (0.4, 0.6, 0.8)
#: z-score above which a sample counts as off the manifold
THRESHOLD = 6.0


# ------------------------------------------------------------------------------------ noise typicality
def _dct_matrix(n: int, dtype, device) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n): c = M x."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype=dtype, device=device)


def _group_energies(x: torch.Tensor, bands: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, n): each sample's energy in every group (B, G) and the group sizes (G,)."""
    if x.dim() != 4:  # packed sequences (B, L, C) as one-channel (L, C) images; flat vectors as one row
        x = x.reshape(x.shape[0], 1, x.shape[1] if x.dim() > 2 else 1, -1)
    b, c, h, w = x.shape
    coef = _dct_matrix(h, x.dtype, x.device) @ x @ _dct_matrix(w, x.dtype, x.device).T
    u = torch.arange(h, device=x.device, dtype=x.dtype)[:, None] / h
    v = torch.arange(w, device=x.device, dtype=x.dtype)[None, :] / w
    band = ((u + v) / 2 * bands).floor().clamp_max(bands - 1).long().flatten()  # (H·W,) band of each coefficient
    freq = torch.zeros(b, bands, device=x.device, dtype=x.dtype).index_add_(1, band, coef.pow(2).sum(1).flatten(1))
    counts = torch.bincount(band, minlength=bands).to(x.dtype) * c
    by_rows, by_cols = min(blocks, h), min(blocks, w)
    rows = torch.arange(h, device=x.device) * by_rows // h
    cols = torch.arange(w, device=x.device) * by_cols // w
    cell = (rows[:, None] * by_cols + cols[None, :]).flatten()
    space = torch.zeros(b, c, by_rows * by_cols, device=x.device, dtype=x.dtype).index_add_(
        2, cell, x.pow(2).flatten(2)).flatten(1)
    sizes = torch.bincount(cell, minlength=by_rows * by_cols).to(x.dtype).repeat(c)
    keep = counts > 0
    return torch.cat([freq[:, keep], space], 1), torch.cat([counts[keep], sizes])


def group_z(x: torch.Tensor, bands: int = 4, blocks: int = 4) -> torch.Tensor:
    """z_g = (S_g − n_g)/√(2 n_g) of every group of every sample (B, G): ≈ N(0, 1) for white noise."""
    s, n = _group_energies(x, bands, blocks)
    return (s - n) / (2 * n).sqrt()


def typicality_penalty(x: torch.Tensor, bands: int = 4, blocks: int = 4) -> torch.Tensor:
    """T(x) = mean_g z_g² per sample (B,), differentiable: ≈ 1 for white noise, large for a noise whose energy
    left its typical share in some frequency band or spatial block."""
    return group_z(x, bands, blocks).pow(2).mean(1)


@torch.no_grad()
def typicality_z(x: torch.Tensor, bands: int = 4, blocks: int = 4) -> torch.Tensor:
    """The z-score of G·T(x) against χ²(G), per sample (B,): ≈ N(0, 1) for white noise."""
    z = group_z(x.double(), bands, blocks)
    g = z.shape[1]
    return ((z.pow(2).sum(1) - g) / math.sqrt(2 * g)).to(x.dtype)


def noise_flags(x: torch.Tensor, threshold: float = THRESHOLD, bands: int = 4, blocks: int = 4) -> torch.Tensor:
    """Per sample (B,): is the noise atypical for N(0, I) (``typicality_z`` above ``threshold``)?"""
    return typicality_z(x, bands, blocks) > threshold


# ------------------------------------------------------------------------------------ denoising error
def _level_points(num_steps: int, levels=LEVELS) -> list[int]:
    return sorted({min(num_steps - 1, max(0, round(f * (num_steps - 1)))) for f in levels})


def denoising_error(sampler, x0: torch.Tensor, cond=None, uncond=None, *, levels=LEVELS, seed: int = 0,
                    batch_size: int = 64) -> torch.Tensor:
    """e(x_0) = mean_k log mean((x̂₀(α_k x_0 + σ_k ε_k) − x_0)²) per sample (B,), at the grid points ``levels``
    of ``sampler`` (an :class:`adjointdpm.engine.Sampler`); ε_k fixed by ``seed`` (the same for every sample).
    ``cond``: one conditioning for the batch (or one per row). Differentiable in x_0 where autograd records
    (guide's prior); wrap it in ``torch.no_grad()`` to only measure."""
    grid = sampler.grid
    points = _level_points(len(grid), levels)
    out = []
    for start in range(0, x0.shape[0], batch_size):
        x = x0[start:start + batch_size]
        logs = []
        for k, i in enumerate(points):
            g = torch.Generator().manual_seed(int(seed) * 1009 + k)
            eps = torch.randn(x.shape[1:], generator=g, dtype=torch.float32).to(x)
            x_i = float(grid.alpha[i]) * x + float(grid.sigma[i]) * eps
            c = _rows_of(cond, start, x.shape[0], x0.shape[0])
            u = _rows_of(uncond, start, x.shape[0], x0.shape[0])
            _, x0_hat = sampler.predict(i, x_i, c, u)
            logs.append((x0_hat.float() - x.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12).log())
        out.append(torch.stack(logs, 1).mean(1))
    return torch.cat(out)


def _rows_of(tree, start: int, count: int, total: int):
    """The conditioning rows of one batch: a batch-1 conditioning is broadcast, a per-row one sliced."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: _rows_of(v, start, count, total) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor) and tree.dim() > 0:
        if tree.shape[0] == total and total != 1:
            return tree[start:start + count]
        if tree.shape[0] == 1 and count != 1:
            return tree.expand(count, *tree.shape[1:])
    return tree


@dataclass
class ManifoldCalibration:
    """The denoising error of plain samples: its robust centre and scale, the threshold and the fraction of
    the plain samples themselves that the threshold flags (the false-positive rate it was calibrated at)."""

    centre: float
    scale: float
    threshold: float = THRESHOLD
    false_positive_rate: float = 0.0
    count: int = 0

    @classmethod
    def from_errors(cls, errors: torch.Tensor, threshold: float = THRESHOLD) -> "ManifoldCalibration":
        e = errors.double().flatten()
        centre = float(e.median())
        scale = max(float(1.4826 * (e - centre).abs().median()), 1e-6)
        fpr = float(((e - centre) / scale > threshold).double().mean())
        return cls(centre, scale, float(threshold), fpr, int(e.numel()))

    def z(self, errors: torch.Tensor) -> torch.Tensor:
        return (errors.double() - self.centre) / self.scale

    def describe(self) -> dict:
        return {"denoising_error_centre": self.centre, "denoising_error_scale": self.scale,
                "threshold": self.threshold, "plain_samples": self.count,
                "plain_false_positive_rate": self.false_positive_rate}


@torch.no_grad()
def calibrate(sampler, plain_x0: torch.Tensor, cond=None, uncond=None, *, threshold: float = THRESHOLD,
              seed: int = 0) -> ManifoldCalibration:
    """The calibration from the model's own samples ``plain_x0`` (latents sampled from fresh noises)."""
    return ManifoldCalibration.from_errors(denoising_error(sampler, plain_x0, cond, uncond, seed=seed), threshold)


class ManifoldCheck:
    """A model's denoising error with its calibration, ready to score samples of one prompt.

    ``sampler``: the base model without guidance (guidance scale 1) on ``cond``; :meth:`z` is differentiable
    in the latents where autograd records."""

    def __init__(self, sampler, cond, calibration: ManifoldCalibration, uncond=None, seed: int = 0):
        self.sampler, self.cond, self.uncond, self.calibration, self.seed = sampler, cond, uncond, calibration, seed

    @classmethod
    def calibrated(cls, sampler, cond, plain_x0: torch.Tensor, *, uncond=None, threshold: float = THRESHOLD,
                   seed: int = 0) -> "ManifoldCheck":
        return cls(sampler, cond, calibrate(sampler, plain_x0, cond, uncond, threshold=threshold, seed=seed), uncond, seed)

    def z(self, x0: torch.Tensor) -> torch.Tensor:
        cal = self.calibration
        return (denoising_error(self.sampler, x0, self.cond, self.uncond, seed=self.seed) - cal.centre) / cal.scale

    @torch.no_grad()
    def flags(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.z(x0)
        return z, off_manifold(z, self.calibration.threshold)


@torch.no_grad()
def flag_images(sampler, latents: torch.Tensor, cond=None, uncond=None, calibration: ManifoldCalibration | None = None,
                *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, flags) of clean latents (B, …): the denoising-error z-score of each against ``calibration`` and
    whether it is off the manifold (z > calibration.threshold). Without a calibration the batch calibrates
    itself (then a flag means: far from the rest of this batch)."""
    errors = denoising_error(sampler, latents, cond, uncond, seed=seed)
    cal = calibration or ManifoldCalibration.from_errors(errors)
    z = cal.z(errors)
    return z.float(), off_manifold(z, cal.threshold)


def off_manifold(z: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """z > threshold, and a non-finite z (an image the model cannot denoise at all, e.g. NaN pixels) too."""
    return ~(z <= threshold)


def base_sampler(network, schedule, timesteps, prediction_type: str):
    """The model as the denoising error reads it: DDIM on the run's grid, no guidance (scale 1), so x̂₀ is the
    conditional prediction of the prompt alone."""
    import adjointdpm as adpm

    return adpm.build_sampler(network, schedule, timesteps, solver="ddim", prediction_type=prediction_type,
                              guidance_scale=1.0)


def flag_captions(z: torch.Tensor, flags: torch.Tensor, captions: list[str] | None = None) -> list[str]:
    """Per image "z 1.3" (after its caption, if any), with " OFF" when flagged: what comparison.png writes."""
    head = [f"{c}, " for c in captions] if captions is not None else [""] * len(z)
    return [f"{h}z {float(v):.1f}" + (" OFF" if bool(f) else "") for h, v, f in zip(head, z, flags)]
