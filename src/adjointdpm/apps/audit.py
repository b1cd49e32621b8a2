"""``audit``: security auditing by attacks on the initial noise.

An *attack* (see :mod:`adjointdpm.critics.objectives`; the digits model's in
:mod:`adjointdpm.embedded.digit_objectives`) gives,
from the original images, a label y_b per sample and which samples are attacked, and a per-sample loss
L_b to minimise; the noise takes normalised gradient steps projected on the ℓ∞ ball around a *copy* of
the untouched original noise,

    x_b ← Π_{‖x − x_b^orig‖∞ ≤ ε}( x_b − η · g_b / rms(g_b) ),   g_b = ∇_{x_b} L_b(image_b, y_b).

(i) ``classifier``: L = −CE(logits, y) (on the logits, not probabilities); a sample succeeds, and is
frozen, when the classifier's label is no longer y while the judge, if any, keeps its own.
(ii) ``safety``: L = Σ_k relu(score_k + margin) of the safety filter; success when the filter passes the
image (and the judge keeps its label).

With a stochastic solver each sample's injected noises z_{b,i} come from its own seeded stream;
``optimize_noises`` attacks them too: they take the same normalised steps (the RMS over all of a sample's
noises), projected on the ℓ∞ ball of radius ε around their own untouched copies.

Success rates are measured on the attacked images, re-generated from the final noises; each attacked image also
gets the base model's denoising-error z-score against the original samples and the off-manifold flag
(:mod:`.manifold`), reported per image and counted (``off_manifold_count``, ``off_manifold_succeeded``). Several processes:
the samples are sharded (each process attacks its own, no gradient communication) and gathered for the
metrics, the checkpoint and ``attack.safetensors``.
(The original code aliased ``initial = x_T`` so its clamp did nothing, applied CE to softmax outputs
and evaluated the wrong tensor: all three are done right here and tested.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..critics.objectives import Attack
from . import prompt_embeddings
from .errors import UserInputError
from .optimizers import NormalizedSteps
from .options import option, settings_of
from .session import Session
from .task import Application, Evaluation, ParamGroup, Task


@dataclass
class Options:
    """audit's options (its command line; the defaults are the recipe of docs/results.md)."""

    attack: str = option("classifier", "--attack", help="classifier (flip the classifier's label) | safety (pass the safety filter: the pipeline folder's own safety_checker/).")
    classifier: Optional[Path] = option(None, "--classifier", help="Image classifier folder to attack (transformers AutoModelForImageClassification, safetensors).")
    judge: Optional[Path] = option(None, "--judge", help="Evaluation-only image classifier folder: an attack succeeds only if it keeps its label.")
    prompt: Optional[str] = option(None, "--prompt", "-p", help="Prompt of every sample on your own model (default: '').")
    n: int = option(100, "--n", "-n", help="Number of samples attacked (under torchrun write -n: torchrun reads --n as its own option).")
    eps: float = option(0.2, "--eps", help="l-infinity budget around the original noise.")
    step_size: float = option(0.05, "--step-size", help="RMS size of one normalised gradient step.")
    margin: float = option(0.02, "--margin", help="Safety attack: margin below the thresholds.")
    content_weight: float = 0.0  # λ: + λ·mean((image − original image)²), keeps the attacked image close; not an option
    optimize_noises: bool = option(False, "--optimize-noises", help="With a stochastic --solver (ddpm, euler_ancestral, dpmpp2m_sde, lcm, or ddim with --eta > 0): also attack every step's injected noise, within the same --eps (written as noises in attack.safetensors).")
    iters: int = option(6, "--iters", help="Maximum attack iterations.")


#: what summary.json's settings hold and --resume compares, in this order
SETTINGS = ("n", "eps", "step_size", "margin", "content_weight", "prompt", "optimize_noises")


def build(session: Session, options: Options, seed: int = 0) -> "AuditTask":
    """The audit run ``options`` describe, with its attack (:func:`.choose.audit_attack`)."""
    from .choose import audit_attack

    return AuditTask(session, options, audit_attack(session, options), seed=seed)


class AuditTask(Task):
    name = "audit"
    sharded_state = ("done", "succeeded")

    def __init__(self, session: Session, opts: Options, attack: Attack, seed: int = 0):
        if opts.n < 1 or opts.eps <= 0 or opts.step_size <= 0:
            raise UserInputError("--n, --eps and --step-size must be positive")
        self.session, self.opts, self.attack, self.seed, self.dp = session, opts, attack, seed, session.dp
        if opts.n < self.dp.world_size:
            raise UserInputError(f"--n ({opts.n}) must be at least the number of processes ({self.dp.world_size})")
        self.prompts = attack.prompts(session.comps.settings, opts.n, opts.prompt)
        for p in set(self.prompts):
            session.check_prompt(p)

    def describe(self) -> dict:
        return {**self.session.describe(), **settings_of(self.opts, SETTINGS), "attack": self.attack.name}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        s = self.session
        uniq = sorted(set(self.prompts))
        table = s.encode(uniq)
        dp = self.dp  # each process attacks its own rows of the global batch
        self.cond = prompt_embeddings.shard(dp, prompt_embeddings.rows(table, torch.tensor([uniq.index(p) for p in self.prompts])))
        x_T = dp.shard(s.noise(self.opts.n, self.seed))
        self.x_orig = x_T.clone()  # a copy: the projection centre never moves
        self.x = x_T.clone().requires_grad_(True)
        self.sample_ids = dp.shard(torch.arange(self.opts.n))
        self.noise = None  # --optimize-noises: each sample's injected noises, (B, N, …) (rows like x)
        if self.opts.optimize_noises:
            # the centre, re-made identically on resume
            self.original_noise = s.noises_to_optimise(self.sample_ids, self.seed, x_T)
            self.noise = self.original_noise.clone().requires_grad_(True)
        with torch.no_grad():
            latents = s.sample(self.x_orig, self.cond, noise=self.injected_noise(original=True))
            images = s.decode(latents).float()
        self.original_latents, self.original_images = latents, images
        self.manifold = self._manifold_check(latents)
        self.label, self.valid = self.attack.setup(images)
        if not dp.any(self.valid.any()):
            raise UserInputError(f"none of the {self.opts.n} samples is one {self.attack.none_valid}; "
                                 "increase --n or change --seed")
        self.done = ~self.valid  # samples left out count as done from the start
        self.succeeded = torch.zeros_like(self.valid)
        self._active = torch.arange(self.x.shape[0], device=self.x.device)

    def _manifold_check(self, original_latents: torch.Tensor):
        """The base model's denoising error, calibrated on the original samples (the model's own, unattacked):
        an attacked image above the threshold left the model's manifold (:mod:`.manifold`)."""
        from .manifold import ManifoldCalibration, ManifoldCheck, base_sampler, denoising_error

        s = self.session
        sampler = base_sampler(s.network, s.schedule, s.timesteps(0), s.comps.prediction_type)
        with torch.no_grad():  # every process's original samples calibrate (one process: these rows)
            errors = self.dp.gather_shards(denoising_error(sampler, original_latents, self.cond, seed=self.seed))
        return ManifoldCheck(sampler, self.cond, ManifoldCalibration.from_errors(errors), seed=self.seed)

    def injected_noise(self, idx: torch.Tensor | None = None, *, original: bool = False):
        """The injected noises of rows ``idx`` (default all) as ``adpm.sample`` takes them: (N, b, …) of
        the attacked noises (``original``: the untouched ones), the samples' seeded streams, or None."""
        rows = self.original_noise if original and self.noise is not None else self.noise
        return self.session.injected_rows(rows, self.sample_ids, self.seed, idx)

    def param_groups(self):
        groups = [ParamGroup("x_T", {"x": self.x}, {"lr": self.opts.step_size}, sharded=True)]
        if self.noise is not None:
            groups.append(ParamGroup("noises", {"noise": self.noise}, {"lr": self.opts.step_size}, sharded=True))
        return groups

    def make_optimizer(self, groups):
        return NormalizedSteps([t for g in groups for t in g.tensors.values()], lr=self.opts.step_size)

    def counted_modules(self):
        return [self.session.network]

    def state_tensors(self):
        return {"done": self.done.to(torch.uint8), "succeeded": self.succeeded.to(torch.uint8)}

    def load_state_tensors(self, tensors):
        self.done = tensors["done"].bool().to(self.x.device)
        self.succeeded = tensors["succeeded"].bool().to(self.x.device)

    def finished(self) -> bool:
        return bool(self.done.all())

    # ------------------------------------------------------------------ objective
    def objective(self, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample loss of the samples being attacked (``self._active``, in order)."""
        images = self.session.decode(x0)
        keep = 0.0
        if self.opts.content_weight:
            keep = self.opts.content_weight * (images.float() - self.original_images[self._active]).pow(2).flatten(1).mean(1)
        return self.attack.loss(images, self.label[self._active]) + keep

    @torch.no_grad()
    def success(self, images: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.attack.success(images, label) & valid

    def compute_loss(self, iteration, generator):
        # only the samples still being attacked are sampled (a frozen sample costs nothing)
        idx = (~self.done).nonzero().flatten()
        self._active = idx
        # every sample weighs 1 / (samples attacked by all processes): the mean loss of one process
        active = self.dp.position(idx.numel())[1]
        if idx.numel():
            weights = None if active == idx.numel() else torch.full((idx.numel(),), 1.0 / active, device=self.x.device)
            loss, per, x0 = self.session.sampled_loss(self.x[idx], prompt_embeddings.rows(self.cond, idx), self.objective,
                                                      weights=weights, noise=self.injected_noise(idx))
            # the images of the current x: samples that already succeed are frozen where they are
            new = self.success(self.session.decode(x0), self.label[idx], self.valid[idx])
            self.succeeded[idx[new]] = True
            self.done[idx[new]] = True
        else:  # (several processes: this one's samples are all done, others' are not)
            loss = self.x.new_zeros(())
        counts = self.dp.sum(torch.stack([self.succeeded.sum(), self.valid.sum()]))
        return loss, {"success_rate": float(counts[0] / counts[1]), "active": float(active)}

    def before_step(self, iteration):
        for t in (self.x, self.noise):
            if t is not None and t.grad is not None:
                t.grad[self.done] = 0.0

    def after_step(self, iteration):
        pairs = [(self.x, self.x_orig)] + ([] if self.noise is None else [(self.noise, self.original_noise)])
        for current, centre in pairs:
            current.copy_(centre + (current - centre).clamp(-self.opts.eps, self.opts.eps))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, stage: str) -> Evaluation:
        s, dp = self.session, self.dp
        x = self.x.detach()
        untouched = self.noise is None or torch.equal(self.noise.detach(), self.original_noise)
        if stage == "before" and torch.equal(x, self.x_orig) and untouched:
            latents, images = self.original_latents, self.original_images  # sampled in setup from the same noises
        else:
            noise = self.injected_noise()
            noise = noise.detach() if isinstance(noise, torch.Tensor) else noise
            with torch.no_grad():  # the attacked images themselves
                latents = s.sample(x, self.cond, noise=noise)
                images = s.decode(latents).float()
        z, flags = self.manifold.flags(latents)
        # every process's samples (one process: these very tensors)
        images, label, valid = dp.gather_shards(images), dp.gather_shards(self.label), dp.gather_shards(self.valid)
        linf = dp.gather_shards((x - self.x_orig).flatten(1).abs().max(1).values)
        noise_linf = None if self.noise is None else dp.gather_shards(
            (self.noise.detach() - self.original_noise).flatten(1).abs().max(1).values)
        success = self.success(images, label, valid)
        n_valid = int(valid.sum())
        metrics = {
            "attack": self.attack.name, "n": self.opts.n, "n_attacked": n_valid, "eps": self.opts.eps,
            "success_rate": float(success.sum()) / n_valid,
            "linf_max": float(linf.max()), "linf_mean_attacked": float(linf[valid].mean()),
            **({} if noise_linf is None else {"noise_linf_max": float(noise_linf.max())}),
            **self.attack.metrics(images, label, valid),
        }
        z, flags = dp.gather_shards(z.float()), dp.gather_shards(flags)
        metrics.update(manifold_z=[round(float(v), 2) for v in z], off_manifold=[bool(f) for f in flags],
                       off_manifold_count=int(flags.sum()), off_manifold_succeeded=int((flags & success).sum()),
                       manifold_calibration=self.manifold.calibration.describe())
        captions = [(("fooled" if hit else "kept") if attacked else "not attacked") + (" OFF" if off else "")
                    for hit, attacked, off in zip(success.tolist(), valid.tolist(), flags.tolist())]
        return Evaluation(images, metrics, captions=captions)

    def summarize(self, before, after):
        return {"success_rate": after["success_rate"], "eps": self.opts.eps,
                "off_manifold_after": after.get("off_manifold_count"),
                "metrics_from": "the attacked critic" + (" and the judge" if "judge_keeps_label" in after else
                                                         " only (no --judge given)")}

    def write_artifacts(self, out):
        """``attack.safetensors``: ``latents`` (the attacked x_T, a diffusers pipeline's ``latents=``),
        ``original_latents``, ``attacked`` (which samples were attacked) and ``label``; with a stochastic
        solver ``noises`` and ``original_noises`` (N, n, …), what each step injects (``adpm.sample(…,
        noise=noises)`` re-samples the attacked images)."""
        from safetensors.torch import save_file

        dp = self.dp
        tensors = {"latents": dp.gather_shards(self.x.detach()).cpu().contiguous(),
                   "original_latents": dp.gather_shards(self.x_orig).cpu().contiguous(),
                   "attacked": dp.gather_shards(self.valid).to(torch.uint8).cpu(),
                   "label": dp.gather_shards(self.label).cpu().contiguous()}
        if self.session.stochastic:
            for name, original in (("noises", False), ("original_noises", True)):
                tensors[name] = self.session.gathered_noise(self.injected_noise(original=original), self.x)
        if dp.is_main:
            save_file(tensors, str(out / "attack.safetensors"))
        return {"attack": "attack.safetensors"}

    def pipeline_call(self) -> dict:
        """The attacked latents of attack.safetensors with the run's prompts."""
        from .pipeline_call import pipeline_call

        return pipeline_call(self.session, tensors={"latents": "attack.safetensors:latents"}, prompts=self.prompts)


APPLICATION = Application(
    name="audit", options=Options, build=build, report_keys=("success_rate", "judge_keeps_label"), embedded_guidance=1.0,
    help="Security auditing: bounded attacks on x_T against a classifier or the safety filter.")
