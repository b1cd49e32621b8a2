"""``invert``: a visual effect (or any loss) → a text embedding.

Targets show an effect: by default they are made from the model's own images of the initial (empty)
prompt on fixed training noises, with ``effect`` applied (``thicken``: grey dilation, thicker strokes;
``outline``: dilation − erosion, hollow strokes; ``shift``: moved 2 px right and 1 px down); or they are
image files (``targets``: a folder of PNG/JPEG/WebP/BMP/TIFF files, sorted by name, one per training noise,
resized to the model's image size).

The conditioning embedding c (1, L, D), initialised from the empty prompt's, is optimised (AdamW) so
that generations from the fixed noises match the targets:

    min_c  E_b ‖decode(sample(x_b, c)) − target_b‖²

The empty-prompt embedding used for classifier-free guidance stays fixed. Metrics: PSNR to the targets on
the training noises and on held-out noises (whose targets are the same effect applied to their own
initial images), for the initial embedding (before) and the learned one (after); the learned
embedding applied to the held-out noises is what ``after/`` shows (training noises first, then held-out).

With a plug-in ``--loss`` the objective is that loss instead of the distance to targets (there are none),
and the metric is the plug-in loss on the training and the held-out noises.

Output: ``embedding.safetensors`` with ``prompt_embeds`` (1, L, D) and ``negative_prompt_embeds`` — what a
diffusers pipeline takes as ``pipe(prompt_embeds=..., negative_prompt_embeds=...)`` — plus
``initial_prompt_embeds`` and ``latents``, the noises of after/ (the training ones, then the held-out ones);
``pipeline_call.json`` is the pipeline call that gives after/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..critics.morphology import dilate, outline
from ..critics.objectives import Loss
from . import prompt_embeddings
from .errors import UserInputError
from .image_files import image_shape, read_image
from .metrics import psnr
from .options import loss_option, option, settings_of
from .session import Session
from .task import Application, Evaluation, ParamGroup, Task

EFFECTS = ("thicken", "outline", "shift")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def apply_effect(images: torch.Tensor, effect: str) -> torch.Tensor:
    if effect == "thicken":
        return dilate(images)
    if effect == "outline":
        return outline(images)
    if effect == "shift":
        bg = images.amin(dim=(1, 2, 3), keepdim=True)
        out = bg.expand_as(images).clone()
        out[..., 1:, 2:] = images[..., :-1, :-2]
        return out
    raise UserInputError(f"unknown --effect {effect!r}; use one of {', '.join(EFFECTS)}")


@dataclass
class Options:
    """invert's options (its command line; the defaults are the recipe of docs/results.md)."""

    effect: str = option("thicken", "--effect", help="thicken | outline | shift (applied to the model's own images).")
    targets: Optional[Path] = option(None, "--targets", help="Folder of target images (PNG/JPEG/…, sorted by name, one per training noise, resized to the model's size) instead of --effect.")
    loss: Optional[str] = loss_option()
    n_train: int = option(8, "--n-train", help="Training noises.")
    n_heldout: int = option(8, "--n-heldout", help="Held-out noises (metrics only).")
    lr: float = option(0.1, "--lr", help="AdamW learning rate for the embedding.")
    init_prompt: str = option("", "--init-prompt", help="Prompt whose embedding initialises the search (default: empty).")
    iters: int = option(10, "--iters", help="Optimisation iterations.")


#: what summary.json's settings hold and --resume compares, in this order
SETTINGS = ("effect", "targets", "n_train", "n_heldout", "lr", "init_prompt")


def build(session: Session, options: Options, seed: int = 0) -> "InvertTask":
    """The invert run ``options`` describe (a plug-in ``--loss`` replaces the distance to targets)."""
    from .choose import plugin_target

    return InvertTask(session, options, seed=seed, loss=plugin_target(options.loss))


class InvertTask(Task):
    name = "invert"
    loss_name = "inversion loss"

    def __init__(self, session: Session, opts: Options, seed: int = 0, loss: Loss | None = None):
        """``loss``: a plug-in loss replacing the distance to targets."""
        if loss is None and opts.targets is None and opts.effect not in EFFECTS:
            raise UserInputError(f"unknown --effect {opts.effect!r}; use one of {', '.join(EFFECTS)}")
        if loss is not None and opts.targets is not None:
            raise UserInputError("give either --targets or --loss, not both")
        self.session, self.opts, self.seed, self.dp, self.loss = session, opts, seed, session.dp, loss
        session.check_prompt(opts.init_prompt)
        self.shape = image_shape(session.comps)
        self.file_targets = None
        if opts.targets is not None:
            folder = Path(opts.targets).expanduser()
            files = (sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                     if folder.is_dir() else [folder])
            files = [f for f in files if f.name != "grid.png"]
            if not files:
                raise UserInputError(f"--targets {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
            c, h, w = self.shape
            self.file_targets = torch.cat([read_image(f, c, (h, w), what="target image", resize=True)
                                           for f in files]).to(session.device)
            self.n_train = len(files)
        else:
            self.n_train = opts.n_train
        if self.n_train < 1 or opts.n_heldout < 0:
            raise UserInputError("--n-train must be >= 1 and --n-heldout >= 0")
        if self.n_train < self.dp.world_size:
            raise UserInputError(f"{self.n_train} training noises cannot be shared by {self.dp.world_size} processes: "
                                 "use at least one per process")

    def describe(self) -> dict:
        d = {**self.session.describe(), **settings_of(self.opts, SETTINGS), "n_train": self.n_train,
             **(self.loss.describe() if self.loss is not None else {})}
        if self.file_targets is not None:
            d["targets_checksum"] = float(self.file_targets.double().sum())
        return d

    def setup(self) -> None:
        s, o = self.session, self.opts
        self.cond0 = s.encode([o.init_prompt])
        self.cond, self.cond_leaves = prompt_embeddings.trainable(self.cond0)
        self.train_noise = s.noise(self.n_train, self.seed)
        self.held_noise = s.noise(o.n_heldout, self.seed + 7919) if o.n_heldout else None
        with torch.no_grad():
            if self.loss is not None:
                self.train_targets = self.held_targets = None
            elif self.file_targets is not None:
                self.train_targets = self.file_targets
                self.held_targets = None
            else:
                self.train_targets = apply_effect(s.generate_all(self.train_noise, self.cond0, noise=self._streams("train")),
                                                  o.effect)
                self.held_targets = (apply_effect(s.generate_all(self.held_noise, self.cond0, noise=self._streams("held")),
                                                  o.effect)
                                     if self.held_noise is not None else None)

    def param_groups(self):
        return [ParamGroup("cond", self.cond_leaves, {"lr": self.opts.lr, "weight_decay": 0.0})]

    def counted_modules(self):
        return [self.session.network]

    def objective(self, x0: torch.Tensor) -> torch.Tensor:
        images = self.session.decode(x0)
        if self.loss is not None:
            ids = self.dp.shard(torch.arange(self.n_train)).tolist()
            return self.loss.loss(images.float(), prompts=[self.opts.init_prompt] * len(ids), indices=ids)
        targets = self.dp.shard(self.train_targets)
        return (images.float() - targets[: images.shape[0]]).pow(2).flatten(1).mean(1)

    def _streams(self, pool: str, ids: torch.Tensor | None = None):
        """A stochastic solver's injected noises of the ``pool``'s samples ``ids`` (default all): each
        sample's own stream, the same in whichever process samples it (None: deterministic)."""
        n = self.n_train if pool == "train" else self.opts.n_heldout
        return self.session.noise_streams(torch.arange(n) if ids is None else ids,
                                          self.seed if pool == "train" else self.seed + 7919)

    def compute_loss(self, iteration, generator):
        # several processes: each back-propagates its shard's share of the mean loss (the loop sums the
        # gradients of the embedding across processes)
        noise = self.dp.shard(self.train_noise)
        w = None if self.dp.world_size == 1 else torch.full(
            (noise.shape[0],), self.dp.loss_weight(self.n_train) / noise.shape[0], device=noise.device)
        loss, per, x0 = self.session.sampled_loss(noise, self.cond, self.objective, weights=w,
                                                  noise=self._streams("train", self.dp.shard(torch.arange(self.n_train))))
        return loss, {}

    def evaluate(self, stage: str) -> Evaluation:
        s = self.session
        cond = prompt_embeddings.detached(self.cond)
        train = s.generate_all(self.train_noise, cond, noise=self._streams("train"))
        if self.loss is not None:
            metrics = {"plugin_loss_train": self.loss.metrics(train, [self.opts.init_prompt] * len(train))["plugin_loss"]}
        else:
            metrics = {"psnr_train": float(psnr(train, self.train_targets).mean()),
                       "mse_train": float(F.mse_loss(train, self.train_targets))}
        images = [train]
        captions = self._captions(train, self.train_targets)
        if self.held_noise is not None:
            held = s.generate_all(self.held_noise, cond, noise=self._streams("held"))
            images.append(held)
            captions += self._captions(held, self.held_targets)
            if self.held_targets is not None:
                metrics["psnr_heldout"] = float(psnr(held, self.held_targets).mean())
            if self.loss is not None:
                metrics["plugin_loss_heldout"] = self.loss.metrics(held, [self.opts.init_prompt] * len(held))["plugin_loss"]
        metrics["embedding_change"] = prompt_embeddings.relative_change(cond, self.cond0)
        return Evaluation(torch.cat(images), metrics, nrow=max(self.n_train, self.opts.n_heldout), captions=captions)

    def _captions(self, images: torch.Tensor, targets: torch.Tensor | None) -> list[str]:
        """Per image: its PSNR to its target, or its plug-in loss."""
        if targets is not None:
            return [f"PSNR {float(v):.3g}" for v in psnr(images, targets).flatten().tolist()]
        if self.loss is not None:
            per = self.loss.loss(images.float(), prompts=[self.opts.init_prompt] * len(images),
                                 indices=list(range(len(images))))
            return [f"loss {float(v):.3g}" for v in per.flatten().tolist()]
        return [""] * len(images)

    def summarize(self, before, after):
        if self.loss is not None:
            return {"plugin_loss_train_before": before["plugin_loss_train"],
                    "plugin_loss_train_after": after["plugin_loss_train"],
                    "metrics_from": "the optimised plug-in loss only (on the training and the held-out noises)"}
        out = {"psnr_train_before": before["psnr_train"], "psnr_train_after": after["psnr_train"],
               "metrics_from": "the distance to the targets (held-out noises: never optimised)"}
        if "psnr_heldout" in after:
            out.update(psnr_heldout_before=before["psnr_heldout"], psnr_heldout_after=after["psnr_heldout"])
        return out

    def write_artifacts(self, out):
        from safetensors.torch import save_file

        from ..images import save_images

        files = {"embedding": "embedding.safetensors"}
        if self.train_targets is not None:
            files["targets"] = "targets/"
        if self.dp.is_main:  # (the embedding is the same in every process)
            if self.train_targets is not None:
                targets = [self.train_targets] + ([self.held_targets] if self.held_targets is not None else [])
                save_images(torch.cat(targets), out / "targets", nrow=max(self.n_train, self.opts.n_heldout))
            from .pipeline_call import attention_masks

            tensors = {**prompt_embeddings.pipeline_tensors(self.cond, self.session.uncond),
                       **attention_masks(self.cond, self.session.uncond),
                       **{f"initial_{k}": v for k, v in prompt_embeddings.pipeline_tensors(self.cond0).items()},
                       "latents": self._after_noise().cpu().contiguous()}
            save_file(tensors, str(out / "embedding.safetensors"))
        return files

    def _after_noise(self) -> torch.Tensor:
        """The noises of ``after/``: the training ones, then the held-out ones."""
        return self.train_noise if self.held_noise is None else torch.cat([self.train_noise, self.held_noise])

    def pipeline_call(self) -> dict:
        """The learned embedding (repeated per image) on the noises of ``after/``."""
        from .pipeline_call import given_embeddings, pipeline_call

        refs, extra, per_prompt = given_embeddings(self.session, prompt_embeddings.detached(self.cond),
                                                   "embedding.safetensors", len(self._after_noise()))
        return pipeline_call(self.session, tensors={"latents": "embedding.safetensors:latents", **refs},
                             num_images_per_prompt=per_prompt, extra_tensors=extra)


APPLICATION = Application(
    name="invert", options=Options, build=build,
    report_keys=("psnr_train", "psnr_heldout", "plugin_loss_train", "plugin_loss_heldout"), embedded_guidance=1.0,
    help="Text-embedding inversion: learn a conditioning embedding that produces a visual effect (or lowers your loss).")
