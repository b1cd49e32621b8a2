"""Toy problems for the fine-tuning methods, in float64, written from the maths (not from the engine).

* :class:`GaussianModel` — the exact network of Gaussian data N(m + c, Σ) (c: an optional per-sample
  conditioning shift): for x_t = α x₀ + σ ε, with C = α²Σ + σ²I,
      E[ε | x_t] = σ C⁻¹ (x_t − α μ),    E[x₀ | x_t] = μ + α Σ C⁻¹ (x_t − α μ)      (μ = m + c)
  and it predicts ε (VP) or v = ε − x₀ (flow matching, α = 1 − σ). A trainable correction, zero at start,
  is added per grid time: a bias b_k and a matrix A_k (output + b_k + A_k x), so the fine-tuned model can
  move the mean and change the covariance, both or neither.
* :class:`TinyNet` — a small nonlinear MLP (x, time features, conditioning) → output, counting its own
  forward calls and the backward passes through them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

F64 = torch.float64


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, counter):
        ctx.counter = counter
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.vjps += 1
        return grad, None


class GaussianModel(nn.Module):
    def __init__(self, path, times, mean, cov, flow: bool):
        super().__init__()
        d = mean.numel()
        self.path, self.flow = path, flow
        self.register_buffer("m", mean.to(F64))
        self.register_buffer("cov", cov.to(F64))
        self.index = {round(float(t), 6): k for k, t in enumerate(times)}
        self.bias = nn.Parameter(torch.zeros(len(times), d, dtype=F64))
        self.matrix = nn.Parameter(torch.zeros(len(times), d, d, dtype=F64))
        self.register_buffer("scale", torch.ones(len(times), dtype=F64))

    def condition(self, chain, denoiser):
        """Express step k's correction in units of that step's noise s_k in the sampler's mean μ (the
        correction moves μ by s_k·(b_k + A_k x)): Adam then takes equally sized steps at every step of the
        chain. The fixed point of a loss in μ is unchanged; only the optimiser's conditioning is."""
        x = torch.zeros(1, self.m.numel(), dtype=F64)
        with torch.no_grad():
            for k in range(len(self.scale)):
                s = chain.std(k)
                if s <= 0:
                    continue
                before = chain.mean(k, x, denoiser, None, None)
                self.bias[k, 0] = 1.0
                after = chain.mean(k, x, denoiser, None, None)
                self.bias[k, 0] = 0.0
                self.scale[k] = s / float(after[0, 0] - before[0, 0])

    def exact(self, x, t: float, cond=None):
        a, s = float(self.path.alpha(t)), float(self.path.sigma(t))
        mu = self.m if cond is None else self.m + cond
        eye = torch.eye(self.m.numel(), dtype=F64)
        c = a * a * self.cov + s * s * eye
        r = torch.linalg.solve(c, (x - a * mu).T).T  # C⁻¹(x − αμ), row-wise
        eps = s * r
        if not self.flow:
            return eps
        x0 = mu + a * r @ self.cov
        return eps - x0

    def forward(self, x, t, cond=None):
        tf = float(t.reshape(-1)[0])
        k = self.index[round(tf, 6)]
        return self.exact(x, tf, cond) + self.scale[k] * (self.bias[k] + x @ self.matrix[k].T)


class TinyNet(nn.Module):
    def __init__(self, d: int = 3, hidden: int = 16, cond_dim: int = 2, seed: int = 0, T: float = 1000.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.T = T
        self.inp = nn.Linear(d + 2 + cond_dim, hidden).double()
        self.out = nn.Linear(hidden, d).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=F64))
        self.calls = 0
        self.vjps = 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        tt = (t.to(F64) / self.T).reshape(-1, 1).expand(x.shape[0], 1)
        c = torch.zeros(x.shape[0], self.inp.in_features - x.shape[1] - 2, dtype=F64) if cond is None else cond.expand(x.shape[0], -1)
        h = torch.tanh(self.inp(torch.cat([x, torch.sin(3 * tt), torch.cos(3 * tt), c], 1)))
        out = 0.5 * x + self.out(h)
        return _CountBackward.apply(out, self) if out.requires_grad else out


def ddpm_scheduler(steps: int, **config):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, **config)
    sched.set_timesteps(steps)
    return sched


def ddim_scheduler(steps: int, **config):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, **config)
    sched.set_timesteps(steps)
    return sched


def flow_scheduler(steps: int, **config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(steps)
    return sched


def gaussian_problem(flow: bool, steps: int, **config):
    """(scheduler, model) for 2-D Gaussian data with a correlated covariance."""
    from adjointdpm import schedule_from_scheduler

    sched = flow_scheduler(steps, **config) if flow else ddpm_scheduler(steps, **config)
    mean = torch.tensor([0.5, -0.3], dtype=F64)
    cov = torch.tensor([[0.6, 0.25], [0.25, 0.4]], dtype=F64)
    model = GaussianModel(schedule_from_scheduler(sched), [float(t) for t in sched.timesteps], mean, cov, flow)
    return sched, model


def linear_reward(a: torch.Tensor):
    return lambda x: x @ a


def sample_stats(x: torch.Tensor):
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u * v).sum() / (u.norm() * v.norm()))


def sqrt_spectral(m: torch.Tensor) -> float:
    return math.sqrt(float(torch.linalg.matrix_norm(m, ord=2)))
