"""``guide``: guided sampling / vocabulary expansion.

Optimise the initial noise x_T (or, with ``start_step = S``, the sampler's intermediate state x_S, as
the paper's guided sampling does), and optionally the prompt embedding too, so that the guide classifier
labels the generated image as ``target_class``:

    min_{x, c}  E_b E_v CE(guide(v(decode(sample(x_b, c)))), target)

over ``augment`` random affine views v per image (small rotations, scalings and shifts, the paper's
cutouts: they keep the optimisation from settling on a perturbation that fools the guide alone), with AdamW (or normalised gradient steps); after each step x is put back on its Gaussian shell (DOODL's
renormalisation: |x_b| = √D for x_T, the starting norm for an intermediate state). The result is, per
sample, the iterate with the lowest guide loss seen (``keep_best``; the guide is the objective, the
judge never takes part). Metrics (by the independent judge,
never by the guide): accuracy for the target before/after, and the Fréchet distance of judge
features to real digits of the target class (sklearn digits, the train split as reference; the
held-out split at the same count gives the real-vs-real floor).

On the embedded model the words "eight" and "nine" were never in a training caption, so the prompt
"a handwritten digit eight" does not make 8s: optimising x_T closes that vocabulary gap.

Several processes: the noises are sharded (each process optimises its rows, no gradient communication;
the random views of a sample are the ones it gets in one process) and gathered for the metrics, the
checkpoint and ``optimized.safetensors``; an optimised prompt embedding is replicated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .common import Session, prompt_for_class
from .errors import UserInputError
from .loop import Evaluation, ParamGroup, Task


@dataclass
class GuideOptions:
    target_class: int = 8
    prompt: str | None = None  # default: the canonical prompt of the target class (embedded model), else ""
    n: int = 16
    lr: float = 0.05
    weight_decay: float = 0.0
    renorm: bool = True
    optimize_cond: bool = False
    cond_lr: float = 0.01
    start_step: int = 0
    augment: int = 4  # random affine views per image in the guide loss (the paper's cutouts); 0: none
    view_noise: float = 0.0  # std of Gaussian pixel noise added to each view
    optimizer: str = "adamw"  # or "normalized": x ← x − lr·g/rms(g) per sample (keeps the gradient's spectrum)
    keep_best: bool = True  # the result is each sample's iterate of lowest guide loss (not with optimize_cond)
    stop_loss: float = 0.0  # a sample whose guide loss falls below this is done: no longer sampled or moved


@lru_cache(maxsize=4)
def _real_digit_stats(digit: int):
    """Judge-feature statistics are computed by the caller; here: real digit images of one class
    (train split: reference; held-out split: floor)."""
    from ..embedded.data import load_data

    data = load_data(16)
    xtr, ytr = data.train
    xho, yho = data.held_out
    return xtr[ytr == digit], xho[yho == digit]


class ClassFrechet:
    """Fréchet distance of judge features to real digits of one class, and its real-vs-real floor."""

    def __init__(self, judge, digit: int, device):
        from ..embedded.critics import feature_stats

        self.judge = judge
        ref, held = _real_digit_stats(digit)
        with torch.no_grad():
            self.mu, self.sigma = feature_stats(judge.features(ref.to(device)))
        self.held = held.to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        from ..embedded.critics import feature_stats, frechet_distance

        if images.shape[0] < 2:
            return float("nan")
        return float(frechet_distance(self.mu, self.sigma, *feature_stats(self.judge.features(images))))

    def floor(self, count: int) -> float:
        return self(self.held[: max(2, min(count, len(self.held)))])


class GuideTask(Task):
    name = "guide"

    sharded_state = ("best_x", "best_loss", "done")

    def __init__(self, session: Session, opts: GuideOptions, seed: int = 0):
        self.s, self.o, self.seed, self.dp = session, opts, seed, session.dp
        if not 0 <= opts.target_class <= 9:
            raise UserInputError(f"--target-class must be a digit 0..9 (the guide classifier's classes), got {opts.target_class}")
        if opts.n < max(1, self.dp.world_size):
            raise UserInputError(f"--n must be >= 1 and at least the number of processes ({self.dp.world_size}), "
                                 f"got {opts.n}")
        if opts.optimizer not in ("adamw", "normalized"):
            raise UserInputError(f"--optimizer must be adamw or normalized, got {opts.optimizer!r}")
        self.prompt = opts.prompt if opts.prompt is not None else prompt_for_class(session, opts.target_class)
        session.check_prompt(self.prompt)
        session.timesteps(opts.start_step)

    def describe(self) -> dict:
        return {**self.s.describe(), **asdict(self.o), "prompt": self.prompt}

    def setup(self) -> None:
        s, o = self.s, self.o
        self.cond0 = s.encode([self.prompt])
        x_T = self.dp.shard(s.noise(o.n, self.seed))  # this process's rows of the global batch
        x = s.advance(x_T, self.cond0, o.start_step) if o.start_step > 0 else x_T
        self.x = x.clone().requires_grad_(True)
        n, d = x.shape[0], x[0].numel()
        self.radius = (torch.full((n,), d ** 0.5, device=x.device) if o.start_step == 0
                       else x.flatten(1).norm(dim=1)).to(x.dtype)
        self.cond = self.cond0.clone().requires_grad_(o.optimize_cond)
        self.target = torch.full((n,), o.target_class, dtype=torch.long, device=x.device)
        self.frechet = ClassFrechet(s.critics.judge, o.target_class, s.device)
        self.best_x = self.x.detach().clone()
        self.best_loss = torch.full((n,), float("inf"), device=x.device)
        self.done = torch.zeros(n, dtype=torch.bool, device=x.device)
        self._rows = None

    @property
    def keeps_best(self) -> bool:
        return self.o.keep_best and not self.o.optimize_cond

    def result_x(self) -> torch.Tensor:
        """The optimised state: per sample the best iterate seen (keep_best), else the last one."""
        if not self.keeps_best:
            return self.x.detach()
        seen = torch.isfinite(self.best_loss).view(-1, *([1] * (self.x.dim() - 1)))
        return torch.where(seen, self.best_x, self.x.detach())

    def state_tensors(self):
        return {"best_x": self.best_x, "best_loss": self.best_loss, "done": self.done.to(torch.uint8)}

    def load_state_tensors(self, tensors):
        self.best_x = tensors["best_x"].to(self.x.device).clone()
        self.best_loss = tensors["best_loss"].to(self.x.device).clone()
        self.done = tensors["done"].to(self.x.device).bool()

    def finished(self) -> bool:
        return self.keeps_best and bool(self.done.all())

    def param_groups(self) -> list[ParamGroup]:
        groups = [ParamGroup("x_T" if self.o.start_step == 0 else f"x_{self.o.start_step}", {"x": self.x},
                             {"lr": self.o.lr, "weight_decay": self.o.weight_decay}, sharded=True)]
        if self.o.optimize_cond:
            groups.append(ParamGroup("cond", {"cond": self.cond}, {"lr": self.o.cond_lr, "weight_decay": 0.0}))
        return groups

    def make_optimizer(self, groups):
        if self.o.optimizer == "normalized":
            from .audit import NormalizedSteps

            opt = NormalizedSteps([groups[0].tensors["x"]], lr=self.o.lr)
            for g in groups[1:]:
                opt.add_param_group({"params": list(g.tensors.values()), "lr": g.options["lr"]})
            return opt
        return super().make_optimizer(groups)

    def counted_modules(self):
        return [self.s.unet]

    def objective(self, x0: torch.Tensor) -> torch.Tensor:
        images = self.s.decode(x0)
        b = images.shape[0]
        k = self.o.augment
        if k > 0:
            from ..embedded.data import augment

            g = torch.Generator().manual_seed(self._view_seed)  # the same views at every call of one iteration
            shift = max(1.0, images.shape[-1] / 16)
            # this shard's place among all processes' samples: the views are drawn for all of them and each
            # sample gets its own, so a sample sees the same views in one process as in several
            offset, total = self._rows if self._rows is not None and self._rows[1] - self._rows[0] >= b else (0, b)
            padded = (offset, total) != (0, b)
            if padded:
                images = torch.cat([images.new_zeros((offset, *images.shape[1:])), images,
                                    images.new_zeros((total - offset - b, *images.shape[1:]))])
            views = [augment(images, g, max_rot_deg=10.0, scale=(0.9, 1.1), max_shift_px=shift) for _ in range(k)]
            images = torch.cat(views)
            if self.o.view_noise > 0:  # noisy views: a perturbation that fools the guide alone does not survive
                images = images + self.o.view_noise * torch.randn(images.shape, generator=g).to(images)
            if padded:
                images = images.view(k, total, *images.shape[1:])[:, offset:offset + b].reshape(k * b, *images.shape[1:])
        logits = self.s.critics.guide(images).float()
        ce = F.cross_entropy(logits, self.target[:1].expand(logits.shape[0]), reduction="none")
        return ce.view(max(k, 1), b).mean(0)

    def compute_loss(self, iteration, generator):
        self._view_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        # samples already below stop_loss are not sampled again (only with keep_best: their result is kept)
        n = self.x.shape[0]
        idx = (~self.done).nonzero().flatten() if self.keeps_best else torch.arange(n, device=self.x.device)
        # every sample weighs 1 / (active samples of all processes): the mean loss of one process
        self._rows = self.dp.position(idx.numel())
        active = self._rows[1]
        if idx.numel() == 0:  # (several processes: this one's samples are all done, others' are not)
            return self.x.new_zeros(()), {"guide_accuracy": self.dp.mean(self.target[:0]), "active": float(active)}
        x = self.x if idx.numel() == n else self.x[idx]
        weights = None if active == idx.numel() else torch.full((idx.numel(),), 1.0 / active, device=x.device)
        loss, per, x0 = self.s.sampled_loss(x, self.cond, self.objective, weights=weights, start=self.o.start_step)
        with torch.no_grad():
            per = per.to(self.best_loss.dtype)  # per-sample losses of the current x
            better = per < self.best_loss[idx]
            self.best_loss[idx[better]] = per[better]
            self.best_x[idx[better]] = self.x.detach()[idx[better]]
            if self.keeps_best and self.o.stop_loss > 0:
                self.done |= self.best_loss < self.o.stop_loss
            hits = self.s.critics.guide(self.s.decode(x0)).argmax(-1) == self.target[idx]
        return loss, {"guide_accuracy": self.dp.mean(hits), "active": float(active)}

    def before_step(self, iteration):
        if self.x.grad is not None and self.done.any():
            self.x.grad[self.done] = 0.0

    def after_step(self, iteration):
        if self.o.renorm:
            norm = self.x.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.x.mul_((self.radius / norm).view(-1, *([1] * (self.x.dim() - 1))))
        if self.done.any():  # (AdamW's momentum would still move them)
            self.x[self.done] = self.best_x[self.done]

    def evaluate(self, stage: str) -> Evaluation:
        s, c = self.s, self.s.critics
        x = self.result_x() if stage == "after" else self.x.detach()
        images = self.dp.gather_shards(s.generate(x, self.cond.detach(), start=self.o.start_step))
        judge = c.judge(images).argmax(-1)
        guide = c.guide(images)
        target = torch.full((images.shape[0],), self.o.target_class, dtype=torch.long, device=images.device)
        metrics = {
            "judge_accuracy": float((judge == self.o.target_class).float().mean()),
            "guide_accuracy": float((guide.argmax(-1) == self.o.target_class).float().mean()),
            "guide_loss": float(F.cross_entropy(guide, target)),
            "frechet_to_class": self.frechet(images),
            "frechet_floor_real": self.frechet.floor(images.shape[0]),
            "judge_class_histogram": torch.bincount(judge, minlength=10).tolist(),
        }
        if self.o.optimize_cond and stage == "after":
            # the learned embedding on fresh noises (no per-sample optimisation): does it generalise?
            fresh = s.generate_all(s.noise(self.o.n, self.seed + 7919), self.cond.detach())
            metrics["fresh_noise_judge_accuracy"] = float((c.judge(fresh).argmax(-1) == self.o.target_class).float().mean())
        return Evaluation(images, metrics)

    def summarize(self, before, after):
        return {"judge_accuracy_before": before["judge_accuracy"], "judge_accuracy_after": after["judge_accuracy"]}

    def write_artifacts(self, out):
        from safetensors.torch import save_file

        tensors = {"x": self.dp.gather_shards(self.result_x()).cpu().contiguous()}
        if self.o.optimize_cond:
            tensors["cond"] = self.cond.detach().cpu().contiguous()
        if self.dp.is_main:
            save_file(tensors, str(out / "optimized.safetensors"))
        return {"optimized": "optimized.safetensors"}
