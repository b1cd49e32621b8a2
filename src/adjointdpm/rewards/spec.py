"""``--reward SPEC`` (repeatable) and ``--judge-reward SPEC``: parsing and loading.

A SPEC is ``[WEIGHT*]KIND:TARGET``; the weights are optional (1 by default), written as a number and ``*``
before the term, and several ``--reward`` give the weighted sum R = Σ w_i r_i, maximised::

    clip:FOLDER                 cosine CLIP score of the image to its prompt
    0.5*pickscore:FOLDER        PickScore (exp(logit_scale) · cosine), weight 0.5
    aesthetic:FOLDER            LAION aesthetic predictor (CLIP vision + MLP head)
    hpsv2:FOLDER                HPSv2 / v2.1 (open_clip; the optional extra adjointdpm[hps])
    classifier:FOLDER           log-probability of the class named by the prompt's field "class"
    FILE.py:FUNC                a plug-in function (see adjointdpm.rewards.plugin)
    package.module:FUNC         the same, importable
    NAME[:TARGET]               a kind a caller adds (``kinds={NAME: builder}``): the application adds the
                                digits model's ``digits-guide`` / ``digits-judge`` (adjointdpm.embedded.rewards)

A negative weight turns a term into a penalty. A judge (``--judge-reward``) takes one SPEC without a weight;
it is only evaluated, so a plug-in judge need not be differentiable.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..critics.errors import CriticError
from .base import Reward, RewardSum

FOLDER_KINDS = ("clip", "pickscore", "aesthetic", "hpsv2", "classifier")
KINDS = FOLDER_KINDS + ("plugin",)
_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*(.+?)\s*$")
#: an added kind: builder(parsed spec, device, what) -> Reward (``parsed.target``: the text after "NAME:", or "")
KindBuilder = Callable[["RewardSpec", object, str], Reward]


def _usage(kinds: Mapping[str, KindBuilder] | None = None) -> str:
    added = f"; {' or '.join(kinds)}" if kinds else ""
    return ("use [WEIGHT*]KIND:FOLDER with KIND one of " + ", ".join(FOLDER_KINDS) + added +
            "; or a plug-in FILE.py:FUNC / package.module:FUNC")


@dataclass(frozen=True)
class RewardSpec:
    weight: float
    kind: str  # one of KINDS
    target: str  # the folder, the model folder ("" = embedded) or FILE.py:FUNC / package.module:FUNC
    text: str  # the SPEC as given (without its weight)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def parse_reward_spec(spec: str, what: str = "--reward", kinds: Mapping[str, KindBuilder] | None = None) -> RewardSpec:
    """One SPEC -> its weight, kind and target; one line naming the fix when it is malformed. ``kinds``: the
    kinds a caller adds (their names, ``NAME`` or ``NAME:TARGET``)."""
    usage = _usage(kinds)
    raw = str(spec).strip()
    weight, text = 1.0, raw
    m = _WEIGHT.match(raw)
    if m:
        weight, text = float(m.group(1)), m.group(2)
        if not math.isfinite(weight) or weight == 0:
            raise CriticError(f"{what} {raw!r}: the weight must be a finite non-zero number")
    elif "*" in raw.split(":", 1)[0]:
        raise CriticError(f"{what} {raw!r}: write the weight as a number before '*', e.g. 0.5*clip:FOLDER")
    if not text:
        raise CriticError(f"{what} is empty: {usage}")
    head, sep, tail = text.partition(":")
    if kinds and head in kinds:
        return RewardSpec(weight, head, tail, text)
    if not sep:
        raise CriticError(f"{what} {raw!r}: no ':' — {usage}")
    if head in FOLDER_KINDS:
        if not tail:
            raise CriticError(f"{what} {raw!r}: name the folder, e.g. {head}:/path/to/model")
        return RewardSpec(weight, head, tail, text)
    where, _, func = text.rpartition(":")
    is_file = where.endswith(".py") or "/" in where or Path(where).expanduser().is_file()
    if is_file or ("." in where and where.replace(".", "").replace("_", "").isalnum()) or _is_module(where):
        if not func.isidentifier():
            raise CriticError(f"{what} {raw!r}: a plug-in is FILE.py:FUNC or package.module:FUNC")
        return RewardSpec(weight, "plugin", text, text)
    raise CriticError(f"{what} {raw!r}: unknown reward kind {head!r} — {usage}")


def build_reward(parsed: RewardSpec, device="cpu", what: str = "--reward", judge: bool = False,
                 kinds: Mapping[str, KindBuilder] | None = None) -> Reward:
    """The reward a parsed SPEC names (its weight is not applied here); ``kinds``: the caller's added kinds."""
    if parsed.kind == "plugin":
        from .plugin import PluginReward

        return PluginReward.from_spec(parsed.target, what=what, needs_gradient=not judge).to(device)
    if kinds and parsed.kind in kinds:
        return kinds[parsed.kind](parsed, device, what)
    if parsed.kind in ("clip", "pickscore"):
        from .clip import ClipReward, PickScoreReward

        cls = ClipReward if parsed.kind == "clip" else PickScoreReward
        return cls.from_folder(parsed.target, parsed.text, device, what)
    if parsed.kind == "aesthetic":
        from .aesthetic import AestheticReward

        return AestheticReward.from_folder(parsed.target, parsed.text, device, what)
    if parsed.kind == "hpsv2":
        from .hps import HpsReward

        return HpsReward.from_folder(parsed.target, parsed.text, device, what)
    from .classifier import ClassifierReward

    return ClassifierReward.from_folder(parsed.target, parsed.text, device, what)


def load_rewards(specs: Sequence[str], device="cpu", what: str = "--reward",
                 kinds: Mapping[str, KindBuilder] | None = None) -> RewardSum:
    """``--reward`` given once or more -> the weighted sum R = Σ w_i r_i (every spec parsed before any loads)."""
    if isinstance(specs, str):
        specs = [specs]
    parsed = [parse_reward_spec(s, what, kinds) for s in specs]
    if not parsed:
        raise CriticError(f"no reward given: name at least one with {what} (e.g. {what} clip:FOLDER)")
    return RewardSum([(p.weight, build_reward(p, device, what, kinds=kinds)) for p in parsed])


def load_judge(spec: str, device="cpu", what: str = "--judge-reward",
               kinds: Mapping[str, KindBuilder] | None = None) -> Reward:
    """``--judge-reward SPEC`` -> the judge (evaluated only, never optimised; no weight)."""
    parsed = parse_reward_spec(spec, what, kinds)
    if _WEIGHT.match(str(spec)):
        raise CriticError(f"{what} {spec!r}: a judge takes no weight (it is only evaluated)")
    return build_reward(parsed, device, what, judge=True, kinds=kinds)
