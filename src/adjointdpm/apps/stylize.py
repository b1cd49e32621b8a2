"""``stylize``: fine-tune the weights so generations carry the style of ONE reference image.

Loss on a minibatch of (prompt, noise) pairs from a fixed training pool, by a *style objective*
(:class:`~adjointdpm.critics.folder_objectives.BackboneStyle` on a vision backbone folder, the digits model's
guide trunk in :mod:`adjointdpm.embedded.digit_objectives`, or a plug-in ``--loss``):

    L = (1/L) Σ_l ‖G_l(image) − G_l(ref)‖² / s_l  +  λ ‖φ(image) − φ(image₀)‖² / ‖φ(image₀)‖²

G_l: Gram matrices of the feature network's layers; s_l: the layer's mean distance for the untuned
model's images of the training pool (the untuned model's style loss is 1, the two terms on one scale);
φ: the network's content features, image₀ the untuned model's image from the same prompt and noise.

Full weights (``lora_rank = 0``) or peft LoRA adapters on the attention projections and the
ResNet convolutions (``lora_rank = r``) (see :mod:`.weights`). Metrics on fresh prompts and noises: the objective's (style loss
before/after) and the judge's (on the digits model its accuracy on the prompt's digit, kept ≥ 85 % of
the untuned model's is the bar, and its label agreement with the untuned model on the same noises).

Outputs diffusers loads: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(OUT)``) for a
LoRA, a ``unet/`` folder (``UNet2DConditionModel.from_pretrained(OUT / "unet")``) for full weights.

Several processes: data parallelism. Every process draws the same minibatch, back-propagates its shard's
share of the mean loss (``DataParallel.loss_weight``), and the loop sums the weight gradients across
processes before the step, so the weights stay identical; the untuned and evaluation images are
generated in shards and gathered.

References: ``outline`` (a real digit drawn hollow: the 1-pixel outer contour of its strokes), ``skimage:NAME`` (a texture from
``skimage.data``, e.g. ``skimage:brick``), or a path to any image file (resized to the model's size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..critics.objectives import Judge, Style
from . import prompt_embeddings
from .errors import UserInputError
from .image_files import image_shape, read_image
from .options import judge_option, loss_option, option, settings_of
from .session import Session
from .task import Application, Evaluation, ParamGroup, Task
from .weights import save_weights, trainable_weights


@dataclass
class Options:
    """stylize's options (its command line; the defaults are the recipe of docs/results.md)."""

    reference: Optional[str] = option(None, "--reference", "-r", help="Style image: a path to any image file | skimage:NAME (e.g. skimage:brick) | outline (digits model) (default: outline on the digits model).")
    backbone: Optional[Path] = option(None, "--backbone", help="Vision backbone folder (any transformers model returning hidden states: CLIP vision, ResNet, ConvNeXt, DINOv2) for the Gram style loss.")
    loss: Optional[str] = loss_option()
    judge: Optional[Path] = judge_option()
    lora_rank: int = option(4, "--lora-rank", help="LoRA rank (peft); 0 fine-tunes all the weights.")
    lr: float = option(3e-3, "--lr", help="AdamW learning rate.")
    content_weight: float = option(1.0, "--content-weight", help="Weight of the content term.")
    n_train: int = option(16, "--n-train", help="Training pool of (prompt, noise) pairs.")
    batch: int = option(8, "--batch", help="Pairs per iteration.")
    n_eval: int = option(32, "--n-eval", help="Fresh (prompt, noise) pairs for the metrics.")
    prompt: Optional[str] = option(None, "--prompt", "-p", help="One prompt for all pairs (default: the digit prompts; '' on other models).")
    iters: int = option(10, "--iters", help="Optimisation iterations.")


#: what summary.json's settings hold and --resume compares, in this order
SETTINGS = ("reference", "lora_rank", "lr", "content_weight", "n_train", "batch", "n_eval", "prompt")


def build(session: Session, options: Options, seed: int = 0) -> "StylizeTask":
    """The stylize run ``options`` describe: its objective, judge, prompt pool and reference
    (:func:`.choose.stylize_objective`)."""
    from .choose import stylize_objective

    objective, judge, prompts, named, ref = stylize_objective(session, options)
    return StylizeTask(session, replace(options, reference=ref, prompt=options.prompt or ""), objective, judge,
                       seed=seed, prompts=prompts, references=named)


# ------------------------------------------------------------------------------------- references
def reference_image(spec: str, shape: tuple[int, int, int], named: dict | None = None) -> torch.Tensor:
    """(1, C, H, W) reference in [-1, 1] from a name in ``named`` ({name: shape -> image}, e.g. the digits
    model's 'outline'), 'skimage:NAME' or an image path."""
    c, h, w = shape
    if named and spec in named:
        return named[spec](shape)
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


class StylizeTask(Task):
    name = "stylize"

    def __init__(self, session: Session, opts: Options, objective: Callable[[torch.Tensor | None], Style],
                 judge: Judge | None = None, seed: int = 0, prompts=None, references: dict | None = None):
        """``objective(reference)`` builds the style objective for the reference image; ``prompts(n, offset)``
        gives (prompts, labels or None) of the pool (default: ``opts.prompt`` for all, no labels)."""
        if opts.lora_rank < 0:
            raise UserInputError(f"--lora-rank must be >= 0 (0: full weights), got {opts.lora_rank}")
        if min(opts.n_train, opts.batch, opts.n_eval) < 1:
            raise UserInputError("--n-train, --batch and --n-eval must be >= 1")
        if opts.batch > opts.n_train:
            raise UserInputError(f"--batch ({opts.batch}) cannot exceed --n-train ({opts.n_train})")
        self.dp = session.dp
        if opts.batch < self.dp.world_size:
            raise UserInputError(f"--batch ({opts.batch}) must be at least the number of processes ({self.dp.world_size})")
        self.session, self.opts, self.judge, self.seed = session, opts, judge, seed
        session.check_prompt(opts.prompt or "")
        self.prompt_list = prompts or (lambda n, offset: ([opts.prompt or ""] * n, None))
        self.shape = image_shape(session.comps)
        self.ref = (None if opts.reference in (None, "none") else
                    reference_image(opts.reference, self.shape, references).to(session.device))
        self.objective = objective(self.ref)

    def describe(self) -> dict:
        return {**self.session.describe(), **settings_of(self.opts, SETTINGS), **self.objective.describe(),
                **(self.judge.describe() if self.judge is not None else {})}

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        uniq = sorted(set(prompts))
        for p in uniq:
            self.session.check_prompt(p)
        table = self.session.encode(uniq)
        return prompt_embeddings.rows(table, torch.tensor([uniq.index(p) for p in prompts]))

    def setup(self) -> None:
        s, o = self.session, self.opts
        self.train_prompts, _ = self.prompt_list(o.n_train, 0)
        self.train_cond = self._encode(self.train_prompts)
        self.train_noise = s.noise(o.n_train, self.seed)
        self.eval_prompts, labels = self.prompt_list(o.n_eval, 3)
        self.eval_cond = self._encode(self.eval_prompts)
        self.eval_noise = s.noise(o.n_eval, self.seed + 104729)  # fresh noises, never trained on
        self.eval_labels = None if labels is None else torch.tensor(labels, device=s.device)
        with torch.no_grad():
            train_images = s.generate_all(self.train_noise, self.train_cond, noise=self._streams("train"))
            self.objective.calibrate(train_images)  # the untuned model scores 1 on its training pool
            self.eval_untuned = s.generate_all(self.eval_noise, self.eval_cond, noise=self._streams("eval"))
            labeller = getattr(self.judge, "labels", None)
            self.untuned_labels = labeller(self.eval_untuned) if labeller is not None else None
        self.params = trainable_weights(s.comps, o.lora_rank, self.seed)

    def param_groups(self):
        return [ParamGroup("lora" if self.opts.lora_rank > 0 else "unet", self.params,
                           {"lr": self.opts.lr, "weight_decay": 0.0})]

    def counted_modules(self):
        return [self.session.network]

    def _objective(self, idx: torch.Tensor):
        prompts = [self.train_prompts[i] for i in idx.tolist()]

        def objective(x0):
            return self.objective.loss(self.session.decode(x0).float(), prompts=prompts, indices=idx.tolist())
        return objective

    def _streams(self, pool: str, idx: torch.Tensor | None = None):
        """A stochastic solver's injected noises of the ``pool``'s samples ``idx`` (default all): each
        sample's own stream, the same whichever minibatch or process samples it (None: deterministic)."""
        n = self.opts.n_train if pool == "train" else self.opts.n_eval
        ids = torch.arange(n) if idx is None else idx.cpu()
        return self.session.noise_streams(ids, self.seed if pool == "train" else self.seed + 104729)

    def compute_loss(self, iteration, generator):
        o = self.opts
        idx = torch.randperm(o.n_train, generator=generator)[: o.batch].to(self.session.device)
        idx = self.dp.shard(idx)  # this process's share of the minibatch, weighted by its share of the mean loss
        w = torch.full((idx.numel(),), self.dp.loss_weight(o.batch) / idx.numel(), device=self.session.device)
        loss, per, x0 = self.session.sampled_loss(self.train_noise[idx], prompt_embeddings.rows(self.train_cond, idx), self._objective(idx),
                                                  weights=w, noise=self._streams("train", idx))
        return loss, {}

    def evaluate(self, stage: str) -> Evaluation:
        s = self.session
        images = s.generate_all(self.eval_noise, self.eval_cond, noise=self._streams("eval"))
        metrics = {**self.objective.metrics(images),
                   "mean_abs_change": float((images - self.eval_untuned).abs().mean())}
        if self.judge is not None:
            metrics.update(self.judge.metrics(images, prompts=self.eval_prompts, labels=self.eval_labels))
            if self.untuned_labels is not None:
                metrics["judge_agreement_with_untuned"] = float((self.judge.labels(images) == self.untuned_labels).float().mean())
        return Evaluation(images, metrics, nrow=min(8, len(images)))

    def summarize(self, before, after):
        out = {"metrics_from": ("the objective and the judge (independent, never optimised)" if self.judge is not None
                                else "the optimised objective only (no --judge given: not an independent evaluation)")}
        if "style_loss" in after:
            out.update(style_loss_before=before["style_loss"], style_loss_after=after["style_loss"])
        if "judge_accuracy" in after:  # the bar: >= 0.85 of the untuned model's accuracy
            b = before["judge_accuracy"]
            out["judge_accuracy_kept"] = after["judge_accuracy"] / b if b > 0 else None
        return out

    def write_artifacts(self, out):
        """A LoRA as diffusers' ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out)``), full
        weights as the pipeline's ``unet/`` (or ``transformer/``) folder (``from_pretrained(out / "unet")``)."""
        from ..images import save_images

        if not self.dp.is_main:  # (the weights are the same in every process)
            return {}
        from safetensors.torch import save_file

        save_file({"latents": self.eval_noise.cpu().contiguous()}, str(out / "eval_latents.safetensors"))
        files = {"eval_latents": "eval_latents.safetensors"}  # the noises of after/ (its prompts: settings.prompt)
        if self.ref is not None:
            save_images(self.ref, out / "reference", zoom=4)
            files["reference"] = "reference/"
        return {**save_weights(self.session.comps, out, self.opts.lora_rank), **files}

    def pipeline_call(self) -> dict:
        """The evaluation noises and prompts with the trained LoRA (the output folder) or network folder."""
        from .pipeline_call import pipeline_call
        from .weights import saved_weights_call

        return pipeline_call(self.session, tensors={"latents": "eval_latents.safetensors:latents"},
                             prompts=self.eval_prompts, **saved_weights_call(self.session.comps, self.opts.lora_rank))


APPLICATION = Application(
    name="stylize", options=Options, build=build, report_keys=("style_loss", "judge_accuracy", "plugin_loss"),
    embedded_guidance=1.0,
    help="Stylization: fine-tune the weights (or LoRA) toward one reference image's style, or your loss.")
