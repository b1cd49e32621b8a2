"""``stylize``: fine-tune the weights so generations carry the style of ONE reference image.

Loss on a minibatch of (prompt, noise) pairs from a fixed training pool:

    L = (1/4) Σ_l ‖G_l(image) − G_l(ref)‖² / s_l  +  λ ‖φ(image) − φ(image₀)‖² / ‖φ(image₀)‖²

* G_l: Gram matrices (A Aᵀ / HW) of the feature network's activations after each of its four
  convolutions, at the image's own resolution (greyscale); for colour models the 3×3 Gram of the RGB
  pixels is added. s_l: the layer's mean distance for the untuned model's images of the training pool,
  so the untuned model's style loss is 1 and the two terms are on one scale. The feature network is the guide classifier's convolutional trunk (the judge,
  which scores the result, is never used for training).
* φ: the guide's penultimate features (content), image₀ the untuned model's image from the same
  prompt and noise (computed once, without grad).

Full weights (``lora_rank = 0``) or peft LoRA adapters on the attention projections and the
ResNet convolutions (``lora_rank = r``); gradients by the engine (default: the adjoint).
Metrics on fresh prompts and noises: style loss before/after, and the judge's accuracy on the prompt's
digit (kept ≥ 85 % of the untuned model's is the bar), plus the judge-label agreement with the untuned
model on the same noises.

Several processes: data parallelism. Every process draws the same minibatch, back-propagates its shard's
share of the mean loss (``DataParallel.loss_weight``), and the loop sums the weight gradients across
processes before the step, so the weights stay identical; the untuned and evaluation images are
generated in shards and gathered.

References: ``outline`` (a real digit drawn hollow: the 1-pixel outer contour of its strokes), ``skimage:NAME`` (a texture from
``skimage.data``, e.g. ``skimage:brick``), or a path to an image file (resized to the model's size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..embedded.critics import prepare
from .common import Session, image_shape, prompt_for_class, read_image
from .errors import UserInputError
from .loop import Evaluation, ParamGroup, Task

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


@dataclass
class StylizeOptions:
    reference: str = "outline"
    lora_rank: int = 0  # 0: full weights
    lr: float = 3e-4
    content_weight: float = 1.0
    n_train: int = 32
    batch: int = 8
    n_eval: int = 32
    prompt: str | None = None  # default: the in-vocabulary digit prompts (embedded), else ""


# ------------------------------------------------------------------------------------- references
def _ink(x: torch.Tensor) -> torch.Tensor:
    return (x + 1) / 2


def dilate(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Grey dilation of images in [-1, 1] (bright strokes grow)."""
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def erode(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    return -F.max_pool2d(-x, k, stride=1, padding=k // 2)


def outline(x: torch.Tensor) -> torch.Tensor:
    """Morphological gradient (dilate − erode) of images in [-1, 1]: hollow, outlined strokes."""
    ink = (_ink(dilate(x)) - _ink(erode(x))).clamp(0, 1)
    return ink * 2 - 1


def hollow(x: torch.Tensor) -> torch.Tensor:
    """Crisp outlined strokes: the 1-pixel outer contour of the ink mask (ink > half), white on black,
    the stroke itself left dark (a hollow digit)."""
    mask = (x > 0).to(x.dtype) * 2 - 1
    edge = (dilate(mask) > 0) & (mask < 0)
    return edge.to(x.dtype) * 2 - 1


def reference_image(spec: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """(1, C, H, W) reference in [-1, 1] from 'outline', 'skimage:NAME' or an image path."""
    c, h, w = shape
    if spec == "outline":
        from ..embedded.data import load_digit_images

        x, y = load_digit_images(max(h, w) if max(h, w) <= 64 else 16)
        ref = hollow(x[(y == 0).nonzero()[0]])
        ref = F.interpolate(ref, size=(h, w), mode="bilinear", antialias=True) if ref.shape[-2:] != (h, w) else ref
        return ref.repeat(1, c, 1, 1)
    if spec.startswith("skimage:"):
        import numpy as np
        import skimage.data

        name = spec.split(":", 1)[1]
        fn = getattr(skimage.data, name, None)
        if fn is None or not callable(fn):
            raise UserInputError(f"--reference {spec}: skimage.data has no image {name!r} (try brick, grass, gravel)")
        try:
            arr = np.asarray(fn(), dtype=np.float32)
        except Exception as e:  # some skimage images need a download (pooch): say so in one line
            raise UserInputError(f"--reference {spec}: cannot load it ({type(e).__name__}); use brick, grass or gravel") from None
        arr = arr / (255.0 if arr.max() > 1.5 else 1.0)
        t = torch.from_numpy(arr)
        t = t[None, None] if t.dim() == 2 else t[..., :3].permute(2, 0, 1)[None]
        side = min(t.shape[-2:])
        t = t[..., :side, :side]
        t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True)
        t = t.mean(1, keepdim=True) if c == 1 else (t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t)
        return t.clamp(0, 1) * 2 - 1
    return read_image(spec, c, (h, w), what="--reference image", resize=True)


# ------------------------------------------------------------------------------------- the losses
class StyleLoss(torch.nn.Module):
    """Relative Gram-matrix distance to a reference, on the guide's convolutional activations."""

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


class StylizeTask(Task):
    name = "stylize"

    def __init__(self, session: Session, opts: StylizeOptions, seed: int = 0):
        if opts.lora_rank < 0:
            raise UserInputError(f"--lora-rank must be >= 0 (0: full weights), got {opts.lora_rank}")
        if min(opts.n_train, opts.batch, opts.n_eval) < 1:
            raise UserInputError("--n-train, --batch and --n-eval must be >= 1")
        if opts.batch > opts.n_train:
            raise UserInputError(f"--batch ({opts.batch}) cannot exceed --n-train ({opts.n_train})")
        self.dp = session.dp
        if opts.batch < self.dp.world_size:
            raise UserInputError(f"--batch ({opts.batch}) must be at least the number of processes ({self.dp.world_size})")
        self.s, self.o, self.seed = session, opts, seed
        digits = session.comps.settings.get("in_vocabulary_digits")
        if opts.prompt is not None:
            session.check_prompt(opts.prompt)
            self.digits = None
        else:
            self.digits = list(digits) if digits else None
        self.shape = image_shape(session)
        self.ref = reference_image(opts.reference, self.shape).to(session.device)

    def describe(self) -> dict:
        return {**self.s.describe(), **asdict(self.o)}

    def _prompts(self, n: int, offset: int) -> tuple[list[str], list[int] | None]:
        if self.digits is None:
            return [self.o.prompt or ""] * n, None
        labels = [self.digits[(i + offset) % len(self.digits)] for i in range(n)]
        return [prompt_for_class(self.s, d) for d in labels], labels

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        uniq = sorted(set(prompts))
        table = self.s.encode(uniq)
        return table[torch.tensor([uniq.index(p) for p in prompts])]

    def setup(self) -> None:
        s, o = self.s, self.o
        guide = s.critics.guide
        self.style = StyleLoss(guide, self.ref)
        prompts, _ = self._prompts(o.n_train, 0)
        self.train_cond = self._encode(prompts)
        self.train_noise = s.noise(o.n_train, self.seed)
        eval_prompts, labels = self._prompts(o.n_eval, 3)
        self.eval_cond = self._encode(eval_prompts)
        self.eval_noise = s.noise(o.n_eval, self.seed + 104729)  # fresh noises, never trained on
        self.eval_labels = None if labels is None else torch.tensor(labels, device=s.device)
        with torch.no_grad():
            train_images = s.generate_all(self.train_noise, self.train_cond)
            self.style.calibrate(train_images)  # the untuned model scores 1 on its training pool
            self.train_content = content_features(guide, train_images)
            self.eval_untuned = s.generate_all(self.eval_noise, self.eval_cond)
            self.untuned_judge = s.critics.judge(self.eval_untuned).argmax(-1)
        unet = s.unet
        if o.lora_rank > 0:
            from peft import LoraConfig

            torch.manual_seed(self.seed)
            unet.add_adapter(LoraConfig(r=o.lora_rank, lora_alpha=o.lora_rank, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS))
            self.params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        else:
            unet.requires_grad_(True)
            self.params = dict(unet.named_parameters())
        if not self.params:
            raise UserInputError("no trainable weights were found (LoRA found no target modules?)")

    def param_groups(self):
        return [ParamGroup("lora" if self.o.lora_rank > 0 else "unet", self.params,
                           {"lr": self.o.lr, "weight_decay": 0.0})]

    def counted_modules(self):
        return [self.s.unet]

    def _objective(self, idx: torch.Tensor):
        def objective(x0):
            images = self.s.decode(x0)
            style = self.style(images)
            phi = content_features(self.s.critics.guide, images)
            ref = self.train_content[idx]
            content = (phi - ref).pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-8)
            return style + self.o.content_weight * content
        return objective

    def compute_loss(self, iteration, generator):
        idx = torch.randperm(self.o.n_train, generator=generator)[: self.o.batch].to(self.s.device)
        idx = self.dp.shard(idx)  # this process's share of the minibatch, weighted by its share of the mean loss
        w = torch.full((idx.numel(),), self.dp.loss_weight(self.o.batch) / idx.numel(), device=self.s.device)
        loss, per, x0 = self.s.sampled_loss(self.train_noise[idx], self.train_cond[idx], self._objective(idx), weights=w)
        return loss, {}

    def evaluate(self, stage: str) -> Evaluation:
        s, c = self.s, self.s.critics
        images = s.generate_all(self.eval_noise, self.eval_cond)
        judge = c.judge(images).argmax(-1)
        metrics = {
            "style_loss": float(self.style(images).mean()),
            "judge_agreement_with_untuned": float((judge == self.untuned_judge).float().mean()),
            "mean_abs_change": float((images - self.eval_untuned).abs().mean()),
        }
        if self.eval_labels is not None:
            metrics["judge_accuracy"] = float((judge == self.eval_labels).float().mean())
        return Evaluation(images, metrics, nrow=min(8, len(images)))

    def summarize(self, before, after):
        out = {"style_loss_before": before["style_loss"], "style_loss_after": after["style_loss"]}
        if "judge_accuracy" in after:  # the bar: >= 0.85 of the untuned model's accuracy
            b = before["judge_accuracy"]
            out["judge_accuracy_kept"] = after["judge_accuracy"] / b if b > 0 else None
        return out

    def write_artifacts(self, out):
        from safetensors.torch import save_file

        from ..images import save_images

        name = "lora.safetensors" if self.o.lora_rank > 0 else "unet.safetensors"
        if self.dp.is_main:  # (the weights are the same in every process)
            save_images(self.ref, out / "reference", zoom=4)
            save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(out / name))
        return {"weights": name, "reference": "reference/"}
