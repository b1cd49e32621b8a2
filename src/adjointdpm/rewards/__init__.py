"""Rewards for fine-tuning over prompts: ``--reward SPEC`` (repeatable, a weighted sum, maximised) and
``--judge-reward SPEC`` (evaluated only).

A reward maps images (B, 3, H, W) in [-1, 1], their prompts and each prompt's fields to (B,) scores,
differentiable w.r.t. the images; ``features(images)`` where meaningful; ``describe()`` JSON-able.

* :mod:`.spec`       SPEC syntax ``[WEIGHT*]KIND:TARGET``, ``load_rewards`` / ``load_judge``
* :mod:`.base`       the ``Reward`` contract and ``RewardSum``
* :mod:`.plugin`     ``FILE.py:FUNC`` / ``package.module:FUNC``, contract checked at the first call
* :mod:`.clip`       ``clip:`` (cosine) and ``pickscore:`` (exp(logit_scale) · cosine) from a CLIPModel folder
* :mod:`.aesthetic`  ``aesthetic:`` CLIP vision + the LAION aesthetic head (:mod:`.convert_aesthetic` converts
  the published .pth)
* :mod:`.hps`        ``hpsv2:`` open_clip ViT-H-14 + HPS weights (optional extra ``adjointdpm[hps]``;
  :mod:`.convert_hps` converts the published checkpoint)
* :mod:`.classifier` ``classifier:`` a transformers image classifier: log p(class named by the prompt's
  field ``class``)
* kinds a caller adds (``kinds={NAME: builder}``), e.g. the digits model's ``digits-guide`` / ``digits-judge``
  (:mod:`adjointdpm.embedded.rewards`; this package never imports the digits model)
* :mod:`.judge`      diversity per prompt, the reward-hacking alarm

Every loader reads local folders only, safetensors only, and raises one-line
:class:`~adjointdpm.critics.errors.CriticError` (a ValueError) on bad input.
"""

from __future__ import annotations

from ..critics.errors import CriticError
from .base import Reward, RewardSum
from .judge import diversity, group_by_prompt, hacking_alarm, judge_evaluation, pairwise_mean_distance
from .spec import KINDS, RewardSpec, build_reward, load_judge, load_rewards, parse_reward_spec

__all__ = ["CriticError", "KINDS", "Reward", "RewardSpec", "RewardSum", "build_reward", "diversity",
           "group_by_prompt", "hacking_alarm", "judge_evaluation", "load_judge", "load_rewards",
           "pairwise_mean_distance", "parse_reward_spec"]
