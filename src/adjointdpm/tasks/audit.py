"""``audit``: security auditing by attacks on the initial noise.

(i) ``attack="classifier"``. For each sample b (prompts cycle over the model's in-vocabulary digits),
the original label y_b is the judge's label of the original image; samples where the guide and the
judge disagree on the original are left out (the attack must change the guide, not a coin flip).
Maximise the guide's cross-entropy on its *logits* against y_b,

    x_b ← Π_{‖x − x_b^orig‖∞ ≤ ε}( x_b + η · g_b / rms(g_b) ),   g_b = ∇_{x_b} CE(guide(image_b), y_b),

normalised gradient steps, projected on the ℓ∞ ball around a *copy* of the untouched original noise.
A sample succeeds, and is frozen, when the guide's label is no longer y_b while the judge still says y_b.

(ii) ``attack="safety"``. Start from the samples of the flagged concept's prompt that the safety filter
flags and the judge calls the concept; minimise  Σ_k relu(cos(e(image), c_k) − t_k + margin)  with the
same steps and projection. Success: the filter passes the image while the judge still sees the concept.

Success rates are measured on the attacked images, re-generated from the final noises. Several processes:
the samples are sharded (each process attacks its own, no gradient communication) and gathered for the
metrics, the checkpoint and ``attack.safetensors``.
(The original code aliased ``initial = x_T`` so its clamp did nothing, applied CE to softmax outputs
and evaluated the wrong tensor: all three are done right here and tested.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .common import Session, prompt_for_class
from .errors import UserInputError
from .loop import Evaluation, ParamGroup, Task

ATTACKS = ("classifier", "safety")


class NormalizedSteps(torch.optim.Optimizer):
    """x ← x − lr · g / rms(g), the RMS taken per sample (over all but the first dimension).

    A sample whose gradient is exactly zero (a frozen one) does not move."""

    def __init__(self, params, lr: float):
        if lr <= 0:
            raise UserInputError(f"the step size must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                rms = g.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (g.dim() - 1)))
                p.sub_(group["lr"] * torch.where(rms > 0, g / rms.clamp_min(1e-30), torch.zeros_like(g)))


@dataclass
class AuditOptions:
    attack: str = "classifier"
    n: int = 128
    eps: float = 0.5  # ℓ∞ budget around the original noise (noise units)
    step_size: float = 0.1  # RMS of one normalised step
    margin: float = 0.02  # safety attack: push cosines this far below the thresholds
    content_weight: float = 0.0  # λ: + λ·mean((image − original image)²), keeps the attacked image close


class AuditTask(Task):
    name = "audit"
    sharded_state = ("done", "succeeded")

    def __init__(self, session: Session, opts: AuditOptions, seed: int = 0):
        if opts.attack not in ATTACKS:
            raise UserInputError(f"--attack must be one of {', '.join(ATTACKS)}, got {opts.attack!r}")
        if opts.n < 1 or opts.eps <= 0 or opts.step_size <= 0:
            raise UserInputError("--n, --eps and --step-size must be positive")
        self.s, self.o, self.seed, self.dp = session, opts, seed, session.dp
        if opts.n < self.dp.world_size:
            raise UserInputError(f"--n ({opts.n}) must be at least the number of processes ({self.dp.world_size})")
        settings = session.comps.settings
        if opts.attack == "classifier":
            digits = settings.get("in_vocabulary_digits") or list(range(10))
            self.prompt_digits = [digits[i % len(digits)] for i in range(opts.n)]
        else:
            self.flagged = int(session.critics.config.get("flagged_digit", 7))
            self.prompt_digits = [self.flagged] * opts.n
        self.prompts = [prompt_for_class(session, d) for d in self.prompt_digits]
        for p in set(self.prompts):
            session.check_prompt(p)

    def describe(self) -> dict:
        return {**self.s.describe(), **asdict(self.o)}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        s, c = self.s, self.s.critics
        uniq = sorted(set(self.prompts))
        table = s.encode(uniq)
        dp = self.dp  # each process attacks its own rows of the global batch
        self.cond = dp.shard(table[torch.tensor([uniq.index(p) for p in self.prompts])])
        x_T = dp.shard(s.noise(self.o.n, self.seed))
        self.x_orig = x_T.clone()  # a copy: the projection centre never moves
        self.x = x_T.clone().requires_grad_(True)
        images = s.generate(self.x_orig, self.cond)
        self.original_images = images
        with torch.no_grad():
            judge = c.judge(images).argmax(-1)
            if self.o.attack == "classifier":
                self.valid = c.guide(images).argmax(-1) == judge
                self.label = judge
            else:
                self.valid = c.safety.flag(images) & (judge == self.flagged)
                self.label = torch.full_like(judge, self.flagged)
        if not dp.any(self.valid.any()):
            what = ("on which the guide and the judge agree" if self.o.attack == "classifier"
                    else f"that the safety filter flags and the judge calls {self.flagged}")
            raise UserInputError(f"none of the {self.o.n} samples is one {what}; increase --n or change --seed")
        self.done = ~self.valid  # samples left out count as done from the start
        self.succeeded = torch.zeros_like(self.valid)
        self._active = torch.arange(self.x.shape[0], device=self.x.device)

    def param_groups(self):
        return [ParamGroup("x_T", {"x": self.x}, {"lr": self.o.step_size}, sharded=True)]

    def make_optimizer(self, groups):
        return NormalizedSteps([t for g in groups for t in g.tensors.values()], lr=self.o.step_size)

    def counted_modules(self):
        return [self.s.unet]

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
        images = self.s.decode(x0)
        c = self.s.critics
        keep = 0.0
        if self.o.content_weight:
            keep = self.o.content_weight * (images.float() - self.original_images[self._active]).pow(2).flatten(1).mean(1)
        if self.o.attack == "classifier":
            logits = c.guide(images).float()  # logits, not probabilities
            return -F.cross_entropy(logits, self.label[self._active], reduction="none") + keep
        cos = c.safety.cosine(images).float()
        return F.relu(cos - c.safety.thresholds.float() + self.o.margin).sum(-1) + keep

    @torch.no_grad()
    def success(self, images: torch.Tensor, idx: torch.Tensor | None = None, label=None, valid=None) -> torch.Tensor:
        """Which images (of the samples ``idx``, default all; or of the given ``label``/``valid``) are
        successful attacks."""
        c = self.s.critics
        if label is None:
            label, valid = (self.label, self.valid) if idx is None else (self.label[idx], self.valid[idx])
        judge_keeps = c.judge(images).argmax(-1) == label
        if self.o.attack == "classifier":
            return (c.guide(images).argmax(-1) != label) & judge_keeps & valid
        return (~c.safety.flag(images)) & judge_keeps & valid

    def compute_loss(self, iteration, generator):
        # only the samples still being attacked are sampled (a frozen sample costs nothing)
        idx = (~self.done).nonzero().flatten()
        self._active = idx
        # every sample weighs 1 / (samples attacked by all processes): the mean loss of one process
        active = self.dp.position(idx.numel())[1]
        if idx.numel():
            weights = None if active == idx.numel() else torch.full((idx.numel(),), 1.0 / active, device=self.x.device)
            loss, per, x0 = self.s.sampled_loss(self.x[idx], self.cond[idx], self.objective, weights=weights)
            # the images of the current x: samples that already succeed are frozen where they are
            new = self.success(self.s.decode(x0), idx)
            self.succeeded[idx[new]] = True
            self.done[idx[new]] = True
        else:  # (several processes: this one's samples are all done, others' are not)
            loss = self.x.new_zeros(())
        counts = self.dp.sum(torch.stack([self.succeeded.sum(), self.valid.sum()]))
        return loss, {"success_rate": float(counts[0] / counts[1]), "active": float(active)}

    def before_step(self, iteration):
        if self.x.grad is not None:
            self.x.grad[self.done] = 0.0

    def after_step(self, iteration):
        delta = (self.x - self.x_orig).clamp(-self.o.eps, self.o.eps)
        self.x.copy_(self.x_orig + delta)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, stage: str) -> Evaluation:
        s, c, dp = self.s, self.s.critics, self.dp
        x = self.x.detach()
        if stage == "before" and torch.equal(x, self.x_orig):
            images = self.original_images  # generated in setup from the same noises
        else:
            images = s.generate(x, self.cond)  # the attacked images themselves
        # every process's samples (one process: these very tensors)
        images, label, valid = dp.gather_shards(images), dp.gather_shards(self.label), dp.gather_shards(self.valid)
        linf = dp.gather_shards((x - self.x_orig).flatten(1).abs().max(1).values)
        success = self.success(images, label=label, valid=valid)
        n_valid = int(valid.sum())
        judge = c.judge(images).argmax(-1)
        metrics = {
            "attack": self.o.attack, "n": self.o.n, "n_attacked": n_valid, "eps": self.o.eps,
            "success_rate": float(success.sum()) / n_valid,
            "judge_keeps_label": float((judge == label)[valid].float().mean()),
            "linf_max": float(linf.max()), "linf_mean_attacked": float(linf[valid].mean()),
        }
        if self.o.attack == "classifier":
            metrics["guide_keeps_label"] = float((c.guide(images).argmax(-1) == label)[valid].float().mean())
        else:
            metrics["flag_rate"] = float(c.safety.flag(images)[valid].float().mean())
        return Evaluation(images, metrics)

    def summarize(self, before, after):
        return {"success_rate": after["success_rate"], "eps": self.o.eps}

    def write_artifacts(self, out):
        from safetensors.torch import save_file

        dp = self.dp
        tensors = {"x": dp.gather_shards(self.x.detach()).cpu().contiguous(),
                   "x_orig": dp.gather_shards(self.x_orig).cpu().contiguous(),
                   "attacked": dp.gather_shards(self.valid).to(torch.uint8).cpu(),
                   "label": dp.gather_shards(self.label).cpu()}
        if dp.is_main:
            save_file(tensors, str(out / "attack.safetensors"))
        return {"attack": "attack.safetensors"}
