"""``onestep``: ReFL (ImageReward's reward feedback learning).

Sample without a graph from x_T to a random late step m, then predict x̂₀ in one step from x_m with a graph
and score it:  loss = mean_b ReLU(margin − r(x̂₀^b)),  whose gradient flows through that single network call.
ReFL (ImageReward/ReFL.py) samples 40 steps and draws m uniformly from 30 … 39 with margin 2 (ImageReward's
scale); here m is uniform on round(low·N) … N−1 with ``low`` = 0.75 (30/40), and the margin an option.
The reported rewards are those of the one-step predictions x̂₀, as ReFL scores them.
"""

from __future__ import annotations

import torch

from .counting import CallCounter
from .errors import MethodError
from .method import MethodBase, backward_to_params, trainable
from .rollout import StepReport, checked_rewards


class OneStepMethod(MethodBase):
    name = "onestep"

    def __init__(self, margin: float = 2.0, low: float = 0.75):
        if not 0.0 <= float(low) < 1.0:
            raise MethodError(f"onestep: low must lie in [0, 1) (the earliest step, as a fraction of the steps), got {low!r}")
        self.margin, self.low = float(margin), float(low)

    def options(self):
        return {"margin": self.margin, "low": self.low}

    def draw_step(self, num_steps: int, generator: torch.Generator) -> int:
        first = min(int(round(self.low * num_steps)), num_steps - 1)
        return int(torch.randint(first, num_steps, (1,), generator=generator).item())

    def backward(self, rollout, reward, generator):
        params = trainable(rollout.network)
        m = self.draw_step(rollout.num_steps, generator)
        rollout = rollout.with_noise_from(generator)
        solver = rollout.solver_for()
        cond, uncond = rollout.guided_pair()
        with CallCounter([rollout.network]) as calls:
            with torch.no_grad():
                x, hist = rollout.initial_state(), ()
                for i in range(m):
                    x, hist = solver.step(i, x, hist, cond, uncond)
            with torch.enable_grad():
                _, x0_hat = solver.predict(m, x.detach(), cond, uncond)
                r = checked_rewards(reward, x0_hat, need_grad=True)
                loss = torch.relu(self.margin - r).mean()
                if loss.requires_grad:
                    backward_to_params(loss, params)
        return StepReport(r.detach(), float(loss.detach()), calls.forward, calls.vjp,
                          {"step": m, "active": float((r.detach() < self.margin).float().mean())})
