"""``guide``: guided sampling / vocabulary expansion.

Optimise the initial noise x_T (or, with ``start_step = S``, the sampler's intermediate state x_S, as
the paper's guided sampling does), and optionally the prompt embedding too, so that a *target* (a
classifier's class, a CLIP text, a plug-in loss or, on the digits model, a digit; see
:mod:`adjointdpm.critics.objectives`) is reached:

    min_{x, c}  E_b E_v L_target(v(decode(sample(x_b, c))))

over ``views`` random affine views v per image (small rotations, scalings and shifts, the paper's
cutouts, with Gaussian pixel noise ``view_noise``: they keep the optimisation from settling on a
perturbation that fools the critic alone), with normalised gradient steps x ← x − lr·g/rms(g) (or AdamW);
after each step x is put back on its Gaussian shell (DOODL's renormalisation: |x_b| = √D for x_T, the
starting norm for an intermediate state). The result is, per sample, the iterate with the lowest loss
seen (``keep_best``); a sample whose loss falls below ``stop_loss`` is done. Metrics: the optimised
critic's and, when a judge is given (evaluation only, never optimised), the judge's.

On the model's manifold (:mod:`.manifold`): every iterate's sample x_0 gets the base model's denoising-error
z-score, calibrated on ``calibration_samples`` plain samples of the same prompt (fresh noises); an iterate
with z > ``manifold_threshold`` is *off the manifold* and ranks after every iterate on it in keep-best (and a
sample is done only when the critic is satisfied on the manifold), so the result is not an image that only
fools the critic. ``manifold_weight`` w adds the prior w·relu(z_b) to each sample's loss (differentiated
through the model's denoiser and the sampler), ``typicality_weight`` the noise prior w·T(x_b) (ReNO's norm
regulariser over frequency bands and spatial blocks). summary.json lists per after-image the z-score, the
flag and the noise's typicality z-score; the comparison picture captions each image with its z-score.

Defaults are the recipe of docs/results.md (normalised steps of 0.1, 8 noisy views, stop at CE 0.1, 16
noises, 20 iterations); ``views`` and ``stop_loss`` default to the target's (none for a plug-in loss).

With a stochastic solver each sample's injected noises z_{b,i} come from its own seeded stream (the same
in any batch); ``optimize_noises`` optimises them too, beside x_T (DNO): a (B, N, …) tensor taking the same
steps, each z_{b,i} renormalised to |z| = √D, kept best per sample with x_T.

Several processes: the noises are sharded (each process optimises its rows, no gradient communication;
the random views of a sample are the ones it gets in one process) and gathered for the metrics, the
checkpoint and ``latents.safetensors``; an optimised prompt embedding is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ..critics.objectives import Judge, Target
from ..critics.views import random_affine
from . import prompt_embeddings
from .errors import UserInputError
from .manifold import THRESHOLD as MANIFOLD_THRESHOLD
from .options import judge_option, loss_option, option, settings_of
from .session import Session
from .task import Application, Evaluation, ParamGroup, Task


@dataclass
class Options:
    """guide's options (its command line; the defaults are the recipe of docs/results.md)."""

    target_class: Optional[str] = option(None, "--target-class", help="Class to reach: with --classifier an index or a label name (config.id2label); on the digits model a digit 0-9 (default: 8).")
    classifier: Optional[Path] = option(None, "--classifier", help="Image classifier folder (transformers AutoModelForImageClassification, safetensors): CE to --target-class.")
    clip: Optional[Path] = option(None, "--clip", help="CLIP folder (transformers CLIPModel + tokenizer): guide toward --clip-prompt.")
    clip_prompt: Optional[str] = option(None, "--clip-prompt", help="Text the images should match under --clip (default: --prompt).")
    loss: Optional[str] = loss_option()
    judge: Optional[Path] = judge_option()
    prompt: Optional[str] = option(None, "--prompt", "-p", help="Prompt (default: on the digits model the target's canonical prompt, e.g. 'a handwritten digit eight'; else '').")
    n: int = option(16, "--n", "-n", help="Number of images (noises) optimised together (under torchrun write -n: torchrun reads --n as its own option).")
    lr: float = option(0.1, "--lr", help="Step size for the noise (normalised steps; the AdamW learning rate with --optimizer adamw).")
    weight_decay: float = option(0.0, "--weight-decay", help="AdamW weight decay for the noise.")
    renorm: bool = option(True, "--renorm/--no-renorm", help="Put x_T back on the Gaussian shell after each step (DOODL).")
    optimize_cond: bool = option(False, "--optimize-cond", help="Also optimise the prompt embedding (shared by the batch).")
    optimize_noises: bool = option(False, "--optimize-noises", help="With a stochastic --solver (ddpm, euler_ancestral, dpmpp2m_sde, lcm, or ddim with --eta > 0): also optimise every step's injected noise (written as noises in latents.safetensors).")
    cond_lr: float = option(0.01, "--cond-lr", help="Learning rate for the prompt embedding.")
    start_step: int = option(0, "--start-step", help="Optimise the sampler's state at this step instead of x_T (0 = x_T).")
    views: Optional[int] = option(None, "--views", "--augment", help="Random affine views per image in the loss (cutouts); 0: none (default: 8 for critics, 0 for --loss).")
    view_noise: float = option(0.3, "--view-noise", help="Std of Gaussian pixel noise added to each view (0: none).")
    optimizer: str = option("normalized", "--optimizer", help="normalized (x -= lr * g / rms(g), per noise) | adamw.")
    keep_best: bool = True  # the result is each sample's iterate of lowest loss (not with optimize_cond); not an option
    stop_loss: Optional[float] = option(None, "--stop-loss", help="A noise whose loss falls below this is done (0: never) (default: 0.1 for classifiers, 0 otherwise).")
    iters: int = option(20, "--iters", help="Optimisation iterations.")
    manifold_weight: float = option(0.1, "--manifold-weight", help="Weight of the base model's denoising-error prior in the loss: + w·relu(z) per sample, z the z-score of its denoising error against plain samples (0: none).")
    typicality_weight: float = option(0.0, "--typicality-weight", help="Weight of the noise typicality prior: + w·mean_g z_g² of x_T's frequency bands and spatial blocks (0: none).")
    manifold_threshold: float = option(MANIFOLD_THRESHOLD, "--manifold-threshold", help="Denoising-error z-score above which an image is off the model's manifold: flagged in summary.json and never kept as a result while an unflagged iterate exists (0: no check).")
    calibration_samples: int = option(64, "--calibration-samples", help="Plain samples (fresh noises, same prompt) that calibrate the denoising-error z-score.")


#: what summary.json's settings hold and --resume compares, in this order
SETTINGS = ("prompt", "n", "lr", "weight_decay", "renorm", "optimize_cond", "optimize_noises", "cond_lr", "start_step",
            "views", "view_noise", "optimizer", "keep_best", "stop_loss", "manifold_weight", "typicality_weight",
            "manifold_threshold", "calibration_samples")


def build(session: Session, options: Options, seed: int = 0) -> "GuideTask":
    """The guide run ``options`` describe: its target and judge (:func:`.choose.guide_objective`) and prompt."""
    from .choose import guide_objective

    target, judge, prompt = guide_objective(session, options)
    return GuideTask(session, replace(options, prompt=prompt), target, judge, seed=seed)


class GuideTask(Task):
    name = "guide"
    loss_name = "target loss (mean over views)"

    sharded_state = ("best_x", "best_loss", "done", "best_noise")

    def __init__(self, session: Session, opts: Options, target: Target, judge: Judge | None = None, seed: int = 0):
        self.session, self.opts, self.target, self.judge, self.seed = session, opts, target, judge, seed
        self.dp = session.dp
        if opts.n < max(1, self.dp.world_size):
            raise UserInputError(f"--n must be >= 1 and at least the number of processes ({self.dp.world_size}), "
                                 f"got {opts.n}")
        if opts.optimizer not in ("adamw", "normalized"):
            raise UserInputError(f"--optimizer must be adamw or normalized, got {opts.optimizer!r}")
        self.views = target.default_views if opts.views is None else opts.views
        self.stop_loss = target.default_stop_loss if opts.stop_loss is None else opts.stop_loss
        if self.views < 0:
            raise UserInputError(f"--views must be >= 0, got {self.views}")
        if min(opts.manifold_weight, opts.typicality_weight, opts.manifold_threshold) < 0 or opts.calibration_samples < 2:
            raise UserInputError("--manifold-weight, --typicality-weight and --manifold-threshold must be >= 0 and "
                                 f"--calibration-samples >= 2, got {opts.manifold_weight}, {opts.typicality_weight}, "
                                 f"{opts.manifold_threshold}, {opts.calibration_samples}")
        self.prompt = opts.prompt or ""
        session.check_prompt(self.prompt)
        session.timesteps(opts.start_step)

    def describe(self) -> dict:
        return {**self.session.describe(),
                **settings_of(self.opts, SETTINGS, prompt=self.prompt, views=self.views, stop_loss=self.stop_loss),
                **self.target.describe(), **(self.judge.describe() if self.judge is not None else {})}

    def setup(self) -> None:
        s, o = self.session, self.opts
        self.cond0 = s.encode([self.prompt])
        x_T = self.dp.shard(s.noise(o.n, self.seed))  # this process's rows of the global batch
        self.sample_ids = self.dp.shard(torch.arange(o.n))
        x = s.advance(x_T, self.cond0, o.start_step) if o.start_step > 0 else x_T
        self.x = x.clone().requires_grad_(True)
        n, d = x.shape[0], x[0].numel()
        self.radius = (torch.full((n,), d ** 0.5, device=x.device) if o.start_step == 0
                       else x.flatten(1).norm(dim=1)).to(x.dtype)
        self.cond, self.cond_leaves = prompt_embeddings.trainable(self.cond0, o.optimize_cond)
        self.noise = None  # --optimize-noises: each sample's injected noises, (B, N, …) (rows like x)
        if o.optimize_noises:
            # (with --start-step a stochastic solver was refused by advance above, a deterministic one is here)
            self.noise = s.noises_to_optimise(self.sample_ids, self.seed, x).requires_grad_(True)
            self.best_noise = self.noise.detach().clone()
        self.best_x = self.x.detach().clone()
        self.best_loss = torch.full((n,), float("inf"), device=x.device)
        self.done = torch.zeros(n, dtype=torch.bool, device=x.device)
        self._rows = None
        self._active = torch.arange(n, device=x.device)
        self.manifold = self.manifold_check() if (o.manifold_threshold > 0 or o.manifold_weight > 0) else None
        self._last_z = self._last_critic = None

    #: seed offset of the calibration's plain noises (never the run's own noises)
    CALIBRATION_SEED = 104_729

    def manifold_check(self, threshold: float | None = None):
        """The base model's denoising error on this prompt, calibrated on plain samples from fresh noises
        (``threshold``: the flag's, default --manifold-threshold; 0 never flags)."""
        from .manifold import ManifoldCheck, base_sampler

        s, o = self.session, self.opts
        sampler = base_sampler(s.network, s.schedule, s.timesteps(0), s.comps.prediction_type)
        with torch.no_grad():
            plain = torch.cat([s.sample(s.noise(o.calibration_samples, self.seed + self.CALIBRATION_SEED)[i:i + 64],
                                        self.cond0) for i in range(0, o.calibration_samples, 64)])
        threshold = o.manifold_threshold if threshold is None else threshold
        return ManifoldCheck.calibrated(sampler, self.cond0, plain, threshold=threshold or float("inf"), seed=self.seed)

    #: what ranks a flagged iterate after every unflagged one in keep-best
    OFF_MANIFOLD_RANK = 1e6

    @property
    def keeps_best(self) -> bool:
        return self.opts.keep_best and not self.opts.optimize_cond

    def _result(self, current: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """Per sample the best iterate seen (keep_best), else the last one."""
        if not self.keeps_best:
            return current.detach()
        seen = torch.isfinite(self.best_loss).view(-1, *([1] * (current.dim() - 1)))
        return torch.where(seen, best, current.detach())

    def result_x(self) -> torch.Tensor:
        return self._result(self.x, self.best_x)

    def injected_noise(self, idx: torch.Tensor | None = None, *, result: bool = False):
        """The injected noises of rows ``idx`` (default all) as ``adpm.sample`` takes them: (N, b, …) of
        the optimised noises (``result``: the kept ones), the samples' seeded streams, or None."""
        rows = self._result(self.noise, self.best_noise) if result and self.noise is not None else self.noise
        return self.session.injected_rows(rows, self.sample_ids, self.seed, idx)

    def state_tensors(self):
        extra = {} if self.noise is None else {"best_noise": self.best_noise}
        return {"best_x": self.best_x, "best_loss": self.best_loss, "done": self.done.to(torch.uint8), **extra}

    def load_state_tensors(self, tensors):
        self.best_x = tensors["best_x"].to(self.x.device).clone()
        self.best_loss = tensors["best_loss"].to(self.x.device).clone()
        self.done = tensors["done"].to(self.x.device).bool()
        if self.noise is not None:
            self.best_noise = tensors["best_noise"].to(self.x.device).clone()

    def finished(self) -> bool:
        return self.keeps_best and bool(self.done.all())

    def param_groups(self) -> list[ParamGroup]:
        o = self.opts
        groups = [ParamGroup("x_T" if o.start_step == 0 else f"x_{o.start_step}", {"x": self.x},
                             {"lr": o.lr, "weight_decay": o.weight_decay}, sharded=True)]
        if o.optimize_cond:
            groups.append(ParamGroup("cond", self.cond_leaves, {"lr": o.cond_lr, "weight_decay": 0.0}))
        if o.optimize_noises:
            groups.append(ParamGroup("noises", {"noise": self.noise}, {"lr": o.lr, "weight_decay": o.weight_decay},
                                     sharded=True))
        return groups

    def make_optimizer(self, groups):
        if self.opts.optimizer == "normalized":
            from .optimizers import NormalizedSteps

            opt = NormalizedSteps([groups[0].tensors["x"]], lr=self.opts.lr)
            for g in groups[1:]:
                opt.add_param_group({"params": list(g.tensors.values()), "lr": g.options["lr"]})
            return opt
        return super().make_optimizer(groups)

    def counted_modules(self):
        return [self.session.network]

    def _views(self, images: torch.Tensor) -> torch.Tensor:
        """``self.views`` random views of each image, (views · B, C, H, W), view-major."""
        b, k = images.shape[0], self.views
        g = torch.Generator().manual_seed(self._view_seed)  # the same views at every call of one iteration
        shift = max(1.0, images.shape[-1] / 16)
        # this shard's place among all processes' samples: the views are drawn for all of them and each
        # sample gets its own, so a sample sees the same views in one process as in several
        offset, total = self._rows if self._rows is not None and self._rows[1] - self._rows[0] >= b else (0, b)
        padded = (offset, total) != (0, b)
        if padded:
            images = torch.cat([images.new_zeros((offset, *images.shape[1:])), images,
                                images.new_zeros((total - offset - b, *images.shape[1:]))])
        views = torch.cat([random_affine(images, g, max_rot_deg=10.0, scale=(0.9, 1.1), max_shift_px=shift)
                           for _ in range(k)])
        if self.opts.view_noise > 0:  # noisy views: a perturbation that fools the critic alone does not survive
            views = views + self.opts.view_noise * torch.randn(views.shape, generator=g).to(views)
        if padded:
            views = views.view(k, total, *views.shape[1:])[:, offset:offset + b].reshape(k * b, *views.shape[1:])
        return views

    def objective(self, x0: torch.Tensor) -> torch.Tensor:
        images = self.session.decode(x0).float()
        b, k = images.shape[0], max(self.views, 1)
        ids = self.sample_ids.to(self._active.device)[self._active].tolist()
        if self.views > 0:
            images = self._views(images)
        per = self.target.loss(images, prompts=[self.prompt] * (k * b), indices=ids * k).view(k, b).mean(0)
        self._last_critic = per.detach()
        if self.manifold is not None:  # the base model's denoising error: a prior (weight > 0) and the flag
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.opts.manifold_weight > 0):
                z = self.manifold.z(x0)
            self._last_z = z.detach()
            if self.opts.manifold_weight > 0:
                per = per + self.opts.manifold_weight * torch.relu(z).to(per.dtype)
        return per

    def compute_loss(self, iteration, generator):
        self._view_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        # samples already below stop_loss are not sampled again (only with keep_best: their result is kept)
        n = self.x.shape[0]
        idx = (~self.done).nonzero().flatten() if self.keeps_best else torch.arange(n, device=self.x.device)
        self._active = idx
        # every sample weighs 1 / (active samples of all processes): the mean loss of one process
        self._rows = self.dp.position(idx.numel())
        active = self._rows[1]
        if idx.numel() == 0:  # (several processes: this one's samples are all done, others' are not)
            return self.x.new_zeros(()), {"active": float(active)}
        every = idx.numel() == n
        x = self.x if every else self.x[idx]
        weights = None if active == idx.numel() else torch.full((idx.numel(),), 1.0 / active, device=x.device)
        self._last_z = self._last_critic = None
        loss, per, x0 = self.session.sampled_loss(x, self.cond, self.objective, weights=weights,
                                                  start=self.opts.start_step,
                                                  noise=self.injected_noise(None if every else idx))
        if self.opts.typicality_weight > 0:  # the noise's typicality prior (bands and blocks of x_T)
            from .manifold import typicality_penalty

            w = torch.full((idx.numel(),), 1.0 / idx.numel(), device=x.device) if weights is None else weights
            prior = self.opts.typicality_weight * typicality_penalty(x)
            loss = loss + (prior * w.to(prior.dtype)).sum()
            per = per + prior.detach().to(per.dtype)
        logs = {"active": float(active)}
        with torch.no_grad():
            per = per.to(self.best_loss.dtype)  # per-sample losses of the current x
            critic = per if self._last_critic is None else self._last_critic.to(per.dtype)
            flagged = None
            if self._last_z is not None and self._last_z.shape == per.shape:
                flagged = self._last_z.to(per.device) > self.manifold.calibration.threshold
                # an iterate off the manifold ranks after every one on it, whatever the critic says
                per = per + self.OFF_MANIFOLD_RANK * flagged.to(per.dtype)
                logs["off_manifold"] = self.dp.mean(flagged.float())
            better = per < self.best_loss[idx]
            self.best_loss[idx[better]] = per[better]
            self.best_x[idx[better]] = self.x.detach()[idx[better]]
            if self.noise is not None:
                self.best_noise[idx[better]] = self.noise.detach()[idx[better]]
            if self.keeps_best and self.stop_loss > 0:  # done: the critic is satisfied by an iterate on the manifold
                reached = critic < self.stop_loss
                if flagged is not None:
                    reached &= ~flagged
                self.done[idx[reached & better]] = True
            hits = self.target.hits(self.session.decode(x0))
            if hits is not None:
                logs["critic_hits"] = self.dp.mean(hits)
        return loss, logs

    def before_step(self, iteration):
        for t in (self.x, self.noise):
            if t is not None and t.grad is not None and self.done.any():
                t.grad[self.done] = 0.0

    def after_step(self, iteration):
        if self.opts.renorm:
            norm = self.x.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.x.mul_((self.radius / norm).view(-1, *([1] * (self.x.dim() - 1))))
            if self.noise is not None:  # every injected noise back on the sphere of its dimension
                z = self.noise.flatten(2)
                z.mul_((z.shape[-1] ** 0.5 / z.norm(dim=2, keepdim=True).clamp_min(1e-12)))
        if self.done.any():  # (momentum would still move them)
            self.x[self.done] = self.best_x[self.done]
            if self.noise is not None:
                self.noise[self.done] = self.best_noise[self.done]

    def evaluate(self, stage: str) -> Evaluation:
        s, o = self.session, self.opts
        x = self.result_x() if stage == "after" else self.x.detach()
        noise = self.injected_noise(result=stage == "after")
        noise = noise.detach() if isinstance(noise, torch.Tensor) else noise
        with torch.no_grad():
            latents = s.sample(x, prompt_embeddings.detached(self.cond), start=o.start_step, noise=noise)
            images = self.dp.gather_shards(s.decode(latents).float())
        prompts = [self.prompt] * images.shape[0]
        metrics = dict(self.target.metrics(images))
        per_image = self.target.loss(images, prompts=prompts, indices=list(range(images.shape[0])))
        captions = [f"loss {float(v):.3g}" for v in per_image.flatten().tolist()]
        if self.manifold is not None:  # per image: the base model's denoising-error z-score and the flag
            from .manifold import flag_captions, typicality_z

            z, flags = self.manifold.flags(latents)
            z, flags = self.dp.gather_shards(z.float()), self.dp.gather_shards(flags)
            metrics.update(manifold_z=[round(float(v), 2) for v in z], off_manifold=[bool(f) for f in flags],
                           off_manifold_count=int(flags.sum()),
                           noise_typicality_z=[round(float(v), 2) for v in self.dp.gather_shards(typicality_z(x.float()))])
            captions = flag_captions(z, flags, captions)
            if stage == "before":
                metrics["manifold_calibration"] = self.manifold.calibration.describe()
        if self.judge is not None:
            metrics.update(self.judge.metrics(images, prompts=prompts))
            if o.optimize_cond and stage == "after":
                # the learned embedding on fresh noises (no per-sample optimisation): does it generalise?
                fresh = s.generate_all(s.noise(o.n, self.seed + 7919), prompt_embeddings.detached(self.cond))
                metrics.update({f"fresh_noise_{k}": v for k, v in self.judge.metrics(fresh, prompts=prompts).items()
                                if isinstance(v, float)})
        return Evaluation(images, metrics, captions=captions)

    def summarize(self, before, after):
        out = {"metrics_from": ("the judge (independent, never optimised) and the optimised critic"
                                if self.judge is not None else
                                "the optimised critic only (no --judge given: not an independent evaluation)")}
        if "judge_accuracy" in after:
            out.update(judge_accuracy_before=before["judge_accuracy"], judge_accuracy_after=after["judge_accuracy"])
        if "off_manifold_count" in after:
            out.update(off_manifold_after=after["off_manifold_count"], manifold_calibration=before["manifold_calibration"])
        return out

    def write_artifacts(self, out):
        """``latents.safetensors``: ``latents`` (the optimised x_T, what a diffusers pipeline takes as
        ``latents=``), with a stochastic solver ``noises`` (N, n, …), what each step injected (optimised or
        not; ``adpm.sample(…, noise=noises)`` re-samples ``after/``), and with --optimize-cond
        ``prompt_embeds`` (the pipeline's ``prompt_embeds=``)."""
        from safetensors.torch import save_file

        tensors = {"latents": self.dp.gather_shards(self.result_x()).cpu().contiguous()}
        if self.session.stochastic:
            tensors["noises"] = self.session.gathered_noise(self.injected_noise(result=True), self.x)
        if self.opts.optimize_cond:
            from .pipeline_call import attention_masks

            tensors.update(prompt_embeddings.pipeline_tensors(self.cond, self.session.uncond))
            tensors.update(attention_masks(self.cond, self.session.uncond))
        if self.dp.is_main:
            save_file(tensors, str(out / "latents.safetensors"))
        return {"latents": "latents.safetensors"}

    def pipeline_call(self) -> dict:
        """The latents (and with --optimize-cond the embeddings, repeated per image) of latents.safetensors."""
        from .pipeline_call import given_embeddings, pipeline_call

        o, file = self.opts, "latents.safetensors"
        tensors = {"latents": f"{file}:latents"}
        if not o.optimize_cond:
            return pipeline_call(self.session, tensors=tensors, prompts=[self.prompt] * o.n, start=o.start_step)
        refs, extra, per_prompt = given_embeddings(self.session, prompt_embeddings.detached(self.cond), file, o.n)
        return pipeline_call(self.session, tensors={**tensors, **refs}, num_images_per_prompt=per_prompt,
                             start=o.start_step, extra_tensors=extra)


APPLICATION = Application(
    name="guide", options=Options, build=build,
    report_keys=("judge_accuracy", "frechet_to_class", "critic_accuracy", "clip_score", "plugin_loss", "judge_clip_score"),
    help="Guided sampling / vocabulary expansion: optimise x_T toward a class, a text or your loss.")
