"""``adjoint-matching``: Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen, ICLR 2025).

Fine-tunes towards p*(x) ∝ p_base(x) e^{λ r(x)} (λ = ``reward_scale`` > 0) by regression, not by
differentiating the sampler. Per iteration:

1. Sample the rollout's batch with the *current* model under the memoryless sampler of
   :mod:`.memoryless` (VP: DDPM; flow: the σ = √(2η) SDE), with classifier-free guidance as the rollout
   gives it, without a graph, keeping X_0 … X_K and the noises ξ_k.
2. Lean adjoint (:mod:`.lean_adjoint`) with the *base* model, without guidance: ã_K = −λ∇r(X_K),
   ã_k = J_{μ_base}(X_k)ᵀ ã_{k+1}.
3. At ``steps`` sampled steps (the same for the whole batch; as the reference code draws them: half from
   the first 60 % of the noisy steps, half from the rest), the loss per sample and step
       e_{b,k} = ‖(μ_θ(X_k) − μ_base(X_k))/s_k + s_k ã_{k+1}‖²
   with μ_θ the current model without guidance (the only term with a graph) and s_k the step's noise
   standard deviation; steps without noise (a final jump to σ = 0) carry no control and are not sampled.
   Pairing: X_k with ã_{k+1} ("next", the default) — for a step X_{k+1} = μ(X_k) + s_k ξ_k the optimal
   controlled step tilts N(μ_base, s_k²) by E[e^{λr} | X_{k+1}], whose log-gradient is −ã_{k+1}: the mean
   moves by −s_k² ã_{k+1}, which is exact for a linear reward on Gaussian data and what the test of the
   tilted distribution measures. The reference code pairs X_k with ã_k ("current"; O(h) apart); it is
   the option ``pairing=current``, and measured worse on that test.
4. Outliers, as the reference code: entries with √e above an exponential moving average (decay 0.9) of
   the batch's 90th percentile of √e are dropped (counted as 0 in the mean); ``quantile=off`` keeps all.
   (When every sampled step of a batch is used, ``steps`` ≥ K, a step whose entries are all larger than
   the others' can be dropped at every iteration and never trained; the default of 4 random steps avoids it.)
   loss = mean over (b, k) of e · kept.

The rollout's ``solver`` and ``eta`` are not used: the memoryless sampler replaces them on the same grid;
its ``noise`` (a seed, tensor or None: drawn from the generator) gives ξ_k.

Costs, per iteration: K forwards (sampling) + up to K forwards and VJPs (the lean adjoint, which stops at
the lowest step it needs) + ``steps`` forwards and VJPs (the loss); μ_base at the sampled steps is reused
from the lean adjoint's forwards.
"""

from __future__ import annotations

import math

import torch

from ..stochastic import resolve_noise
from .base_model import BaseModel
from .counting import CallCounter
from .errors import MethodError
from .lean_adjoint import lean_adjoint
from .memoryless import MemorylessChain
from .method import MethodBase, backward_to_params, seed_from, trainable
from .rollout import Rollout, StepReport, checked_rewards

PAIRINGS = ("next", "current")
GUIDANCE = ("sampling", "all")


class AdjointMatchingMethod(MethodBase):
    name = "adjoint-matching"

    def __init__(self, reward_scale: float = 1.0, steps: int = 4, pairing: str = "next", quantile=0.9,
                 ema_decay: float = 0.9, guidance: str = "sampling"):
        if isinstance(reward_scale, bool) or not isinstance(reward_scale, (int, float)) or not reward_scale > 0 \
                or not math.isfinite(reward_scale):
            raise MethodError(f"adjoint-matching: the reward scale λ must be a number > 0, got {reward_scale!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise MethodError(f"adjoint-matching: steps (sampled per trajectory) must be an integer ≥ 1, got {steps!r}")
        if pairing not in PAIRINGS:
            raise MethodError(f"adjoint-matching: pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        if quantile in ("off", "none", None):
            quantile = None
        elif isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile <= 1.0:
            raise MethodError(f"adjoint-matching: quantile must lie in (0, 1] or be 'off', got {quantile!r}")
        if guidance not in GUIDANCE:
            raise MethodError(f"adjoint-matching: guidance must be one of {', '.join(GUIDANCE)}, got {guidance!r}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise MethodError(f"adjoint-matching: ema_decay must lie in [0, 1), got {ema_decay!r}")
        self.reward_scale, self.steps, self.pairing = float(reward_scale), steps, pairing
        self.quantile, self.ema_decay = (None if quantile is None else float(quantile)), float(ema_decay)
        self.guidance = guidance
        self.base: BaseModel | None = None
        self.ema_value, self.ema_updates = None, 0
        #: data parallel: a function gathering every process's (B_p, steps) losses, shards of any size (e.g.
        #: ``DataParallel.gather_shards``), so the percentile is the global batch's, as the reference code takes it
        self.gather = None

    def options(self):
        return {"reward_scale": self.reward_scale, "steps": self.steps, "pairing": self.pairing,
                "quantile": "off" if self.quantile is None else self.quantile, "ema_decay": self.ema_decay, "guidance": self.guidance}

    # -- state -------------------------------------------------------------------------------------
    def prepare(self, network, base=None) -> None:
        """Record the base model: the network's adapters switched off, or a frozen copy of it now (call
        before the first update), or ``base`` (a frozen copy of the original weights, for a resumed run)."""
        self.base = BaseModel(network, base)

    def state_dict(self) -> dict:
        return {"ema_value": self.ema_value, "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema_value, self.ema_updates = state["ema_value"], int(state["ema_updates"])

    def _ema_update(self, value: float) -> float:
        """The reference code's running threshold: the first value, a running average while fewer than
        1/decay values were seen, then decay·EMA + (1 − decay)·value."""
        n = self.ema_updates
        warm_up = 1.0 / self.ema_decay if self.ema_decay > 0 else 0.0
        if n == 0:
            self.ema_value = value
        elif n < warm_up:
            self.ema_value = value / (n + 1) + (1.0 - 1.0 / (n + 1)) * self.ema_value
        else:
            self.ema_value = self.ema_decay * self.ema_value + (1.0 - self.ema_decay) * value
        self.ema_updates = n + 1
        return self.ema_value

    # -- the steps ---------------------------------------------------------------------------------
    def sample_steps(self, controlled: list[int], generator: torch.Generator) -> list[int]:
        """``steps`` distinct steps: half from the first 60 % of the noisy steps, the rest from the others."""
        n = len(controlled)
        if n <= self.steps:
            return list(controlled)
        middle = min(max(round(n * 0.6), 1), n - 1)
        first = min(self.steps // 2, middle)
        second = min(self.steps - first, n - middle)
        first = self.steps - second
        early = torch.randperm(middle, generator=generator)[:first]
        late = middle + torch.randperm(n - middle, generator=generator)[:second]
        picked = sorted(int(i) for i in torch.cat([early, late]))
        return [controlled[i] for i in picked]

    def sample_chain(self, rollout: Rollout, chain: MemorylessChain, generator: torch.Generator):
        """X_0 … X_K from the current model with the rollout's guidance, without a graph."""
        x = rollout.initial_state()
        num = chain.num_steps
        source = resolve_noise(rollout.seeded_noise(seed_from(generator)) if rollout.noise is None else rollout.noise,
                               num, x)
        current = rollout.denoiser()
        cond, uncond = rollout.guided_pair()
        states = [x]
        with torch.no_grad():
            for k in range(num):
                x = chain.step(k, x, current, cond, uncond, source.noise_at(k, x))
                states.append(x)
        return states

    def backward(self, rollout, reward, generator):
        if self.base is None:
            raise MethodError("adjoint-matching needs its base model: call method.prepare(network) before the first update")
        params = trainable(rollout.network)
        chain = MemorylessChain(rollout)
        lam = self.reward_scale
        with CallCounter([rollout.network, self.base.frozen]) as calls:
            states = self.sample_chain(rollout, chain, generator)
            x_end = states[-1].detach().requires_grad_()
            with torch.enable_grad():
                r = checked_rewards(reward, x_end, need_grad=True)
                (grad_r,) = torch.autograd.grad(r.sum(), x_end)
            terminal = -lam * grad_r
            controlled = [k for k in range(chain.num_steps) if chain.std(k) > 0.0]
            if not controlled:
                raise MethodError("adjoint-matching: no step of this grid injects noise; use more than one step")
            picked = self.sample_steps(controlled, generator)
            shift = 1 if self.pairing == "next" else 0
            cond, uncond = rollout.guided_pair() if self.guidance == "all" else (rollout.cond, None)
            scale = rollout.guidance_scale if uncond is not None else 1.0
            with self.base() as base_net:
                base = rollout.denoiser(base_net, guidance_scale=scale)
                adjoints, base_means = lean_adjoint(chain, base, states, terminal, cond,
                                                    {k + shift for k in picked}, set(picked), uncond)
            current = rollout.denoiser(guidance_scale=scale)
            errors, control, target = [], [], []
            with torch.enable_grad():
                for k in picked:
                    s = chain.std(k)
                    mu = chain.mean(k, states[k].detach(), current, cond, uncond)
                    u = (mu - base_means[k]) / s
                    t = s * adjoints[k + shift]
                    errors.append((u + t).flatten(1).pow(2).sum(1))
                    control.append(u.detach().flatten(1).pow(2).sum(1))
                    target.append(t.flatten(1).pow(2).sum(1))
                e = torch.stack(errors, 1)  # (B, steps)
                kept = torch.ones_like(e)
                threshold = math.inf
                if self.quantile is not None:
                    root = e.detach().sqrt()
                    everyone = root if self.gather is None else self.gather(root)
                    threshold = self._ema_update(float(torch.quantile(everyone.flatten().double(), self.quantile)))
                    kept = (root < threshold).to(e.dtype)
                loss = (e * kept).mean()
                backward_to_params(loss, params)
        stats = {"steps": picked, "kept": float(kept.mean()), "threshold": threshold,
                 "control_norm": float(torch.stack(control, 1).mean()), "target_norm": float(torch.stack(target, 1).mean())}
        return StepReport(r.detach(), float(loss.detach()), calls.forward, calls.vjp, stats)
