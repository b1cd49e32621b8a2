"""The embedded digits model's critics as the applications' objectives and judges.

What only makes sense on the digits model lives here, next to it: the digit prompts ("a handwritten
digit eight"), ``--target-class 0..9`` meaning a digit, the guide classifier as the optimised critic,
the independent judge and the Fréchet distance to real digits as the evaluation, the digit safety
filter as the audited filter, and the guide's convolutional trunk as the style feature network. Each
class implements a protocol of :mod:`adjointdpm.critics.objectives`, as its generic counterpart in
:mod:`adjointdpm.critics.folder_objectives` does (the applications
call them without knowing which model they run on).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..critics.folder_objectives import StyleObjective
from .critics import feature_stats, frechet_distance, prepare

DIGITS = range(10)


# ----------------------------------------------------------------------------------- prompts
def digit_prompt(settings: dict, digit: int) -> str:
    """The canonical prompt of a digit on the embedded model ("a handwritten digit eight"); "" elsewhere."""
    words, templates = settings.get("words"), settings.get("caption_templates")
    if words and templates and 0 <= digit < len(words):
        return templates[0].format(words[digit])
    return ""


def in_vocabulary_digits(settings: dict) -> list[int]:
    return list(settings.get("in_vocabulary_digits") or DIGITS)


def check_digit(target) -> int:
    from ..critics import CriticError

    text = str(target).strip()
    if not text.isdigit() or not 0 <= int(text) <= 9:
        raise CriticError(f"--target-class must be a digit 0..9 on the digits model (the guide classifier's classes), "
                          f"got {target}")
    return int(text)


# ----------------------------------------------------------------------------------- guide
class DigitTarget:
    """guide: cross-entropy of the guide classifier's logits to one digit."""

    default_views = 8
    default_stop_loss = 0.1

    def __init__(self, critics, digit: int):
        self.critics, self.digit = critics, check_digit(digit)

    def describe(self) -> dict:
        return {"critic": "digits guide classifier", "target_class": self.digit}

    def loss(self, images, *, prompts, indices):
        logits = self.critics.guide(images).float()
        return F.cross_entropy(logits, torch.full((logits.shape[0],), self.digit, device=logits.device), reduction="none")

    @torch.no_grad()
    def hits(self, images):
        return self.critics.guide(images).argmax(-1) == self.digit

    @torch.no_grad()
    def metrics(self, images) -> dict:
        guide = self.critics.guide(images).float()
        target = torch.full((images.shape[0],), self.digit, dtype=torch.long, device=images.device)
        return {"guide_accuracy": float((guide.argmax(-1) == self.digit).float().mean()),
                "guide_loss": float(F.cross_entropy(guide, target))}


@lru_cache(maxsize=4)
def _real_digits(digit: int):
    """Real images of one digit: the train split (reference) and the held-out split (floor)."""
    from .data import load_data

    data = load_data(16)
    (xtr, ytr), (xho, yho) = data.train, data.held_out
    return xtr[ytr == digit], xho[yho == digit]


class DigitFrechet:
    """Fréchet distance of judge features to real digits of one class, and its real-vs-real floor."""

    def __init__(self, judge, digit: int, device):
        self.judge = judge
        ref, held = _real_digits(digit)
        with torch.no_grad():
            self.mu, self.sigma = feature_stats(judge.features(ref.to(device)))
        self.held = held.to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        if images.shape[0] < 2:
            return float("nan")
        return float(frechet_distance(self.mu, self.sigma, *feature_stats(self.judge.features(images))))

    def floor(self, count: int) -> float:
        return self(self.held[: max(2, min(count, len(self.held)))])


class DigitJudge:
    """The independent judge (never optimised): accuracy for a digit, Fréchet distance, label histogram."""

    def __init__(self, critics, digit: int | None = None, device="cpu"):
        self.critics, self.digit = critics, digit
        self.frechet = None if digit is None else DigitFrechet(critics.judge, digit, device)

    def describe(self) -> dict:
        return {"judge": "digits judge classifier (independent of the guide)"}

    @torch.no_grad()
    def labels(self, images):
        return self.critics.judge(images).argmax(-1)

    @torch.no_grad()
    def metrics(self, images, *, prompts=None, labels=None) -> dict:
        judge = self.labels(images)
        out = {"judge_class_histogram": torch.bincount(judge, minlength=10).tolist()}
        if self.digit is not None:
            out.update(judge_accuracy=float((judge == self.digit).float().mean()),
                       frechet_to_class=self.frechet(images), frechet_floor_real=self.frechet.floor(images.shape[0]))
        if labels is not None:
            out["judge_accuracy"] = float((judge == labels).float().mean())
        return out


# ----------------------------------------------------------------------------------- audit
class DigitClassifierAttack:
    """Flip the guide classifier's label of a digit while the judge still sees it. The label of a sample is
    the judge's label of the original image; samples where the guide and the judge disagree are left out."""

    name = "classifier"

    def __init__(self, critics):
        self.critics = critics

    def prompts(self, settings: dict, n: int, prompt=None) -> list[str]:
        digits = in_vocabulary_digits(settings)
        return [digit_prompt(settings, digits[i % len(digits)]) for i in range(n)]

    @torch.no_grad()
    def setup(self, images):
        judge = self.critics.judge(images).argmax(-1)
        return judge, self.critics.guide(images).argmax(-1) == judge

    def loss(self, images, label):
        return -F.cross_entropy(self.critics.guide(images).float(), label, reduction="none")

    @torch.no_grad()
    def success(self, images, label):
        return (self.critics.guide(images).argmax(-1) != label) & (self.critics.judge(images).argmax(-1) == label)

    @torch.no_grad()
    def metrics(self, images, label, valid) -> dict:
        keep = lambda net: float((net(images).argmax(-1) == label)[valid].float().mean())  # noqa: E731
        return {"judge_keeps_label": keep(self.critics.judge), "guide_keeps_label": keep(self.critics.guide)}

    none_valid = "on which the guide and the judge agree"


class DigitSafetyAttack:
    """Pass the digit safety filter (it flags one digit) while the judge still sees that digit."""

    name = "safety"

    def __init__(self, critics, margin: float):
        self.critics, self.margin = critics, margin
        self.flagged = int(critics.config.get("flagged_digit", 7))
        self.none_valid = f"that the safety filter flags and the judge calls {self.flagged}"

    def prompts(self, settings: dict, n: int, prompt=None) -> list[str]:
        return [digit_prompt(settings, self.flagged)] * n

    @torch.no_grad()
    def setup(self, images):
        judge = self.critics.judge(images).argmax(-1)
        return torch.full_like(judge, self.flagged), self.critics.safety.flag(images) & (judge == self.flagged)

    def loss(self, images, label):
        safety = self.critics.safety
        return F.relu(safety.cosine(images).float() - safety.thresholds.float() + self.margin).sum(-1)

    @torch.no_grad()
    def success(self, images, label):
        return (~self.critics.safety.flag(images)) & (self.critics.judge(images).argmax(-1) == label)

    @torch.no_grad()
    def metrics(self, images, label, valid) -> dict:
        return {"judge_keeps_label": float((self.critics.judge(images).argmax(-1) == label)[valid].float().mean()),
                "flag_rate": float(self.critics.safety.flag(images)[valid].float().mean())}


# ----------------------------------------------------------------------------------- stylize
class StyleLoss(torch.nn.Module):
    """Relative Gram-matrix distance to a reference, on the guide's convolutional activations (after each of
    its four convolutions, greyscale) plus, for colour images, the 3×3 Gram of the RGB pixels."""

    def __init__(self, guide: torch.nn.Module, reference: torch.Tensor):
        super().__init__()
        self.guide = guide
        self.layers = [i for i, m in enumerate(guide.body) if isinstance(m, torch.nn.SiLU)][:4]
        self.colour = reference.shape[1] == 3
        with torch.no_grad():
            self.ref = [g.detach() for g in self.grams(reference)]

    def grams(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        if self.colour:
            p = x.flatten(2)
            out.append(p @ p.transpose(1, 2) / p.shape[-1])
        h = x.mean(1, keepdim=True) if x.shape[1] != 1 else x
        last = self.layers[-1]
        for i, m in enumerate(self.guide.body):
            h = m(h)
            if i in self.layers:
                a = h.flatten(2)
                out.append(a @ a.transpose(1, 2) / a.shape[-1])
            if i == last:
                break
        return out

    def layer_distances(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [(g - r).pow(2).flatten(1).sum(1) for g, r in zip(self.grams(x), self.ref)]

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        """Scale each layer so that the untuned model's images (``images``) score 1 on average."""
        self.scale = [d.mean().clamp_min(1e-12) for d in self.layer_distances(images)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dists = self.layer_distances(x)
        scale = getattr(self, "scale", None) or [r.pow(2).sum() for r in self.ref]
        return sum(d / s for d, s in zip(dists, scale)) / len(dists)


def content_features(guide: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return guide.body(prepare(x))


class DigitStyle(StyleObjective):
    """stylize: the guide trunk's Gram style loss; content = the guide's penultimate features."""

    def __init__(self, critics, reference: torch.Tensor, content_weight: float):
        self.guide, self.content_weight = critics.guide, content_weight
        self.style = StyleLoss(critics.guide, reference)

    def describe(self) -> dict:
        return {"critic": "digits guide trunk (Gram matrices)"}

    def content(self, images):
        return content_features(self.guide, images)


def outline_reference(shape: tuple[int, int, int]) -> torch.Tensor:
    """stylize's ``--reference outline``: a real digit 0 drawn hollow (the 1-pixel outer contour of its
    strokes), at the model's image shape (C, H, W)."""
    from ..critics.morphology import hollow
    from .data import load_digit_images

    c, h, w = shape
    x, y = load_digit_images(max(h, w) if max(h, w) <= 64 else 16)
    ref = hollow(x[(y == 0).nonzero()[0]])
    ref = F.interpolate(ref, size=(h, w), mode="bilinear", antialias=True) if ref.shape[-2:] != (h, w) else ref
    return ref.repeat(1, c, 1, 1)


REFERENCES = {"outline": outline_reference}


def digit_prompts(settings: dict):
    """stylize's prompt pool on the digits model: the in-vocabulary digit prompts in turn, with their labels."""
    digits = in_vocabulary_digits(settings)

    def prompts(n: int, offset: int):
        labels = [digits[(i + offset) % len(digits)] for i in range(n)]
        return [digit_prompt(settings, d) for d in labels], labels
    return prompts
