"""Training data of the embedded model: scikit-learn's handwritten digits, captions, augmentation.

* ``load_digit_images``: the 1,797 real 8x8 digits of ``sklearn.datasets.load_digits`` (grey levels
  0..16), resized to ``size`` x ``size`` with a cubic spline (anti-aliased), and mapped affinely
  to [-1, 1]: ``x = 2 * g / 16 - 1`` (background -1, ink +1), shape (N, 1, size, size).
* ``split``: a fixed, seeded, class-stratified train / held-out split (80 % / 20 %). Everything that
  is trained (diffusion model, critics) sees only the train part; the held-out part is used only to
  measure accuracy and the Frechet distance.
* Captions: digits in ``IN_VOCAB`` get ``"<template> <word>"``; the held-out-vocabulary digits
  (8 and 9) only ever get the generic caption ``"a handwritten digit"``. ``CaptionSampler`` draws a
  batch as (caption mode, class, image): mode null (caption dropped, for classifier-free guidance)
  with probability ``p_null``, generic with ``p_generic``, specific otherwise. Under the null and the
  generic modes the class is uniform over all ten digits, so both p(class | "") and
  p(class | "a handwritten digit") are uniform and guidance on the generic prompt does not favour
  any digit; under the specific mode the class is uniform over the in-vocabulary digits.
* ``augment``: small random affine maps (rotation, isotropic scale, translation) applied with
  bilinear resampling in the ink domain ``(x + 1) / 2`` so that padding is background.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..critics.views import random_affine

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IN_VOCAB = (0, 1, 2, 3, 4, 5, 6, 7)
HELD_OUT_VOCAB = (8, 9)
GENERIC_CAPTION = "a handwritten digit"
# Templates of the specific captions; the first one is the canonical prompt of the tests and CLI.
TEMPLATES = ("a handwritten digit {}", "the digit {}", "the number {}")
TEMPLATE_WEIGHTS = (0.6, 0.2, 0.2)


def prompt_for(digit: int) -> str:
    """The canonical prompt for ``digit`` ("a handwritten digit seven"), in vocabulary or not."""
    return TEMPLATES[0].format(WORDS[digit])


def load_digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 images in [-1, 1] of shape (N, 1, size, size), and labels (N,)."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = d.images.astype(np.float64) / 16.0
    if size != imgs.shape[-1]:
        imgs = np.stack([resize(im, (size, size), order=3, mode="edge", anti_aliasing=True) for im in imgs])
    imgs = np.clip(imgs, 0.0, 1.0) * 2.0 - 1.0
    x = torch.from_numpy(imgs.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def split(labels: torch.Tensor, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-stratified seeded split: (train indices, held-out indices), each sorted."""
    rng = np.random.default_rng(seed)
    lab = labels.numpy()
    train, held = [], []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        rng.shuffle(idx)
        n_held = int(round(held_out_fraction * len(idx)))
        held.extend(idx[:n_held].tolist())
        train.extend(idx[n_held:].tolist())
    return torch.tensor(sorted(train)), torch.tensor(sorted(held))


@dataclass
class DigitsData:
    images: torch.Tensor  # (N, 1, S, S) in [-1, 1]
    labels: torch.Tensor  # (N,)
    train_idx: torch.Tensor
    held_idx: torch.Tensor

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[self.train_idx], self.labels[self.train_idx]

    @property
    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[self.held_idx], self.labels[self.held_idx]


def load_data(size: int = 16, seed: int = 0) -> DigitsData:
    x, y = load_digit_images(size)
    tr, ho = split(y, seed=seed)
    return DigitsData(x, y, tr, ho)


augment = random_affine  # (the training jitter and the applications' random views are one function)


class CaptionSampler:
    """Draws (images, captions, labels) batches from the train split (see module docstring)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, p_null: float = 0.1,
                 p_generic: float = 0.3, seed: int = 0):
        self.images, self.labels = images, labels
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(10)]
        self.p_null, self.p_generic = p_null, p_generic
        self.g = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        g = self.g
        mode_u = torch.rand(batch_size, generator=g)
        all_cls = torch.randint(0, 10, (batch_size,), generator=g)
        inv_cls = torch.tensor(IN_VOCAB)[torch.randint(0, len(IN_VOCAB), (batch_size,), generator=g)]
        tmpl = torch.multinomial(torch.tensor(TEMPLATE_WEIGHTS), batch_size, replacement=True, generator=g)
        pick = torch.rand(batch_size, generator=g)
        captions, idx, cls = [], [], []
        for i in range(batch_size):
            if mode_u[i] < self.p_null:
                c, cap = int(all_cls[i]), ""
            elif mode_u[i] < self.p_null + self.p_generic:
                c, cap = int(all_cls[i]), GENERIC_CAPTION
            else:
                c = int(inv_cls[i])
                cap = TEMPLATES[int(tmpl[i])].format(WORDS[c])
            pool = self.by_class[c]
            idx.append(int(pool[int(pick[i] * len(pool)) % len(pool)]))
            captions.append(cap)
            cls.append(c)
        idx_t = torch.tensor(idx)
        return self.images[idx_t], captions, torch.tensor(cls)
