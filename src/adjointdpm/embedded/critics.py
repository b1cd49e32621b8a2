"""Critics of the embedded digits model: guide, judge, Frechet distance, safety filter.

All are ``nn.Module``s taking images in [-1, 1] of shape (B, C, H, W) (C = 1 or 3, any H, W: colour
is averaged and the image resized, differentiably, to the critics' 16x16) and are differentiable
end to end, because the applications back-propagate through them.

* ``GuideNet`` - the loss network the applications optimise against: a smooth CNN (SiLU, average
  pooling, so its input gradients are smooth) returning 10 digit logits.
* ``JudgeNet`` - the independent evaluator: another architecture (ReLU, max pooling, 5x5 first
  layer, global average pooling), another seed and another training subset than the guide. Its
  penultimate 64-d features define the Frechet distance. Use it only to evaluate, never to optimise.
* ``FrechetDistance`` - FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2) between the
  Gaussian fitted to the judge features of a batch and reference statistics (held-out real
  digits). The trace of the matrix square root is the sum of square roots of the eigenvalues of the
  symmetric PSD matrix S_1^1/2 S_2 S_1^1/2, computed with ``eigh`` in float64 (differentiable).
* ``SafetyFilter`` - analogue of Stable Diffusion's safety checker: an embedding network
  (``EmbedNet``, trained as a cosine classifier, so classes separate by angle) maps an image to a
  unit vector e; the flagged concept is represented by K unit "concept embeddings" c_k (k-means
  centres of the flagged class's training embeddings) with thresholds t_k. The score is
  max_k (cos(e, c_k) - t_k) and an image is flagged when the score is > 0.

``load_critics(path)`` opens them from a model folder that ships them (``critics/``; default: the embedded
model) or from a critics folder, offline, safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_SIZE = 16


def prepare(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, C, H, W) images in [-1, 1] -> (B, 1, size, size), differentiably."""
    if x.dim() != 4:
        raise ValueError(f"critics take images of shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class GuideNet(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * w * (IMAGE_SIZE // 4) ** 2, hidden), nn.SiLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(hidden, 10)
        self.config = {"width": width, "hidden": hidden}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class JudgeNet(nn.Module):
    def __init__(self, width: int = 16, feat: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, feat), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feat, 10)
        self.config = {"width": width, "feat": feat}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feat), used by the Frechet distance."""
        return self.body(prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class EmbedNet(nn.Module):
    """Image -> unit embedding; trained as a cosine classifier: logits = scale * <e, w_c / |w_c|>."""

    def __init__(self, width: int = 12, dim: int = 32, scale: float = 10.0):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
            nn.Linear(4 * w * (IMAGE_SIZE // 4) ** 2, dim),
        )
        self.class_weights = nn.Parameter(torch.randn(10, dim) / dim ** 0.5)
        self.scale = scale
        self.config = {"width": width, "dim": dim, "scale": scale}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(prepare(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.embed(x) @ F.normalize(self.class_weights, dim=-1).T


class SafetyFilter(nn.Module):
    """Flags images close (in cosine) to any of the concept embeddings of one concept."""

    def __init__(self, embedder: EmbedNet, concepts: torch.Tensor, thresholds: torch.Tensor, concept: str):
        super().__init__()
        self.embedder = embedder
        self.register_buffer("concepts", F.normalize(concepts, dim=-1))
        self.register_buffer("thresholds", thresholds)
        self.concept = concept

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) cosine similarities of the image embeddings to the concept embeddings."""
        return self.embedder.embed(x) @ self.concepts.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable score (B,): max_k cos(e, c_k) - t_k; the image is flagged when > 0."""
        return (self.cosine(x) - self.thresholds).max(dim=-1).values

    @torch.no_grad()
    def flag(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) > 0


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    f = feats.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sym_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> torch.Tensor:
    """Frechet distance between N(mu1, s1) and N(mu2, s2) (see module docstring)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r = _sym_sqrt(s1)
    m = r @ s2 @ r
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(1e-12)
    return (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * eig.sqrt().sum()


class FrechetDistance(nn.Module):
    """FD between the judge features of a batch of images (B >= 2) and stored reference statistics."""

    def __init__(self, judge: JudgeNet, mu: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.judge = judge
        self.register_buffer("mu", mu.double())
        self.register_buffer("sigma", sigma.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise ValueError("the Frechet distance needs at least 2 images")
        mu, s = feature_stats(self.judge.features(x))
        return frechet_distance(self.mu, self.sigma, mu, s)


# ---------------------------------------------------------------------------------------- storage
def _save(module: nn.Module, path: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tensors.update(extra or {})
    save_file(tensors, str(path))


def save_critics(folder: str | Path, guide: GuideNet, judge: JudgeNet, safety: SafetyFilter,
                 ref_mu: torch.Tensor, ref_sigma: torch.Tensor, info: dict) -> None:
    """Write guide / judge / safety / frechet safetensors and config.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save(guide, folder / "guide.safetensors")
    _save(judge, folder / "judge.safetensors")
    _save(safety.embedder, folder / "safety.safetensors",
          {"concepts": safety.concepts.float(), "thresholds": safety.thresholds.float()})
    from safetensors.torch import save_file

    save_file({"mu": ref_mu.double().contiguous(), "sigma": ref_sigma.double().contiguous()},
              str(folder / "frechet_reference.safetensors"))
    cfg = {"image_size": IMAGE_SIZE, "guide": guide.config, "judge": judge.config,
           "safety": {**safety.embedder.config, "concept": safety.concept}, **info}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


class Critics(nn.Module):
    """Bundle of the shipped critics (all in eval mode, gradients w.r.t. their weights disabled)."""

    def __init__(self, guide: GuideNet, judge: JudgeNet, safety: SafetyFilter, frechet: FrechetDistance,
                 config: dict):
        super().__init__()
        self.guide, self.judge, self.safety, self.frechet = guide, judge, safety, frechet
        self.config = config


def load_critics_folder(folder: str | Path, device="cpu") -> Critics:
    from safetensors.torch import load_file

    folder = Path(folder)
    need = ["config.json", "guide.safetensors", "judge.safetensors", "safety.safetensors",
            "frechet_reference.safetensors"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"critics folder {folder} lacks {', '.join(missing)}")
    cfg = json.loads((folder / "config.json").read_text())
    guide = GuideNet(**cfg["guide"])
    guide.load_state_dict(load_file(str(folder / "guide.safetensors")))
    judge = JudgeNet(**cfg["judge"])
    judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
    st = load_file(str(folder / "safety.safetensors"))
    sc = dict(cfg["safety"])
    concept = sc.pop("concept")
    emb = EmbedNet(**sc)
    concepts, thresholds = st.pop("concepts"), st.pop("thresholds")
    emb.load_state_dict(st)
    safety = SafetyFilter(emb, concepts, thresholds, concept)
    ref = load_file(str(folder / "frechet_reference.safetensors"))
    frechet = FrechetDistance(judge, ref["mu"], ref["sigma"])
    critics = Critics(guide, judge, safety, frechet, cfg).to(device).eval()
    critics.requires_grad_(False)
    return critics


def load_critics(path=None, device="cpu") -> Critics:
    """The embedded critics (guide, judge, safety filter, Frechet distance) of a model folder.

    ``path`` is a model folder holding ``critics/`` (default: the embedded model) or a critics folder.
    Returns a :class:`Critics` module (eval mode, weights frozen); a folder without critics raises
    :class:`~adjointdpm.components.ComponentsError`.
    """
    from ..components import ComponentsError, model_folder

    root = model_folder(path)
    folder = root / "critics" if (root / "critics").is_dir() else root
    if not (folder / "config.json").is_file() or not (folder / "guide.safetensors").is_file():
        raise ComponentsError(f"{root} has no critics/ folder (critics ship only with the embedded digits model)")
    try:
        return load_critics_folder(folder, device=device)
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        raise ComponentsError(f"cannot load critics from {folder}: {str(e).splitlines()[0]}") from e
