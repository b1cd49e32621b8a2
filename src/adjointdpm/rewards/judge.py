"""Evaluation helpers around a judge reward: diversity per prompt and the reward-hacking alarm.

* ``diversity(features_by_prompt)``: for each prompt, the mean pairwise Euclidean distance between the
  judge's features of its n ≥ 2 images, D = 2/(n(n−1)) Σ_{i<j} ‖f_i − f_j‖ (a collapse of the model to one
  image per prompt sends D to 0).
* ``hacking_alarm(optimised, judge)``: over the evaluation points so far, let p be the point where the
  judge's reward peaked. The alarm rings when the judge has since fallen by more than a tolerance while the
  optimised reward has risen: the model is learning what fools the optimised reward, not what the judge
  (a reward it was never trained on) also sees as better.
* ``judge_evaluation(judge, images, prompts, fields)``: the judge's scores and features without gradients.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..critics.errors import CriticError
from .base import Reward


def pairwise_mean_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over the n(n−1)/2 pairs of rows of ``features`` (n, D); needs n ≥ 2."""
    f = features.detach().flatten(1).double()
    n = f.shape[0]
    if n < 2:
        raise CriticError(f"diversity needs at least 2 images per prompt, got {n}")
    d = torch.cdist(f, f)
    return float(d.triu(diagonal=1).sum() / (n * (n - 1) / 2))


def diversity(features_by_prompt: Mapping[str, torch.Tensor]) -> dict:
    """{"per_prompt": {prompt: D}, "mean": mean over prompts of D} (see the module docstring)."""
    per_prompt = {str(p): pairwise_mean_distance(f) for p, f in features_by_prompt.items()}
    if not per_prompt:
        raise CriticError("diversity needs the features of at least one prompt")
    return {"per_prompt": per_prompt, "mean": sum(per_prompt.values()) / len(per_prompt)}


def group_by_prompt(features: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rows of ``features`` (B, D) grouped by their prompt, in first-seen order."""
    if len(prompts) != features.shape[0]:
        raise CriticError(f"{len(prompts)} prompts for {features.shape[0]} feature rows")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(str(p), []).append(i)
    return {p: features[idx] for p, idx in groups.items()}


def hacking_alarm(optimised: Sequence[float], judge: Sequence[float], tolerance: float = 0.0,
                  relative: float = 0.01, optimised_name: str = "the optimised reward",
                  judge_name: str = "the judge's reward") -> str | None:
    """A one-line warning when the optimised reward rose while the judge's fell, else None.

    ``optimised[k]`` and ``judge[k]`` are the mean rewards at evaluation point k (k = 0 the untuned model).
    With p = argmax_k judge[k], it rings when judge[-1] < judge[p] − tol and optimised[-1] > optimised[p],
    tol = max(``tolerance``, ``relative`` · |judge[p]|) (so evaluation noise alone does not ring it).
    """
    opt, jud = [float(v) for v in optimised], [float(v) for v in judge]
    if len(opt) != len(jud):
        raise CriticError(f"hacking_alarm takes one judge value per evaluation point: {len(opt)} vs {len(jud)}")
    if len(opt) < 2:
        return None
    p = max(range(len(jud)), key=lambda k: jud[k])
    tol = max(float(tolerance), float(relative) * abs(jud[p]))
    last = len(jud) - 1
    if jud[last] < jud[p] - tol and opt[last] > opt[p]:
        return (f"reward hacking? {optimised_name} rose from {opt[p]:.4g} to {opt[last]:.4g} since evaluation "
                f"{p} while {judge_name} fell from {jud[p]:.4g} to {jud[last]:.4g}: inspect the images, lower the "
                "learning rate or the reward scale, or stop at evaluation " + str(p))
    return None


@torch.no_grad()
def judge_evaluation(judge: Reward, images: torch.Tensor, prompts: Sequence[str],
                     fields: Sequence[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scores (B,), features (B, D) or None) of the judge on ``images``, without gradients."""
    features = judge.features(images)
    return judge(images, prompts, fields).detach(), None if features is None else features.detach()
