"""``parse_method("truncated:k=2")``: a method from its command-line spelling.

    NAME[:OPTION=VALUE[,OPTION=VALUE…]]

    exact[:memory=SIZE]                 the full-chain gradient (SIZE: bytes, 8GiB, inf, 0)
    truncated:k=K                       DRaFT-K
    alignprop[:mean=F,std=F]            AlignProp's random truncation (fractions of the steps)
    onestep[:margin=M,low=F]            ReFL
    adjoint[:state=S,steps=N,solver=S]  AdjointDPM's continuous adjoint
    (the four above also take kl=β,kl_steps=S: the KL anchor towards the base model, off at β = 0)
    adjoint-matching[:reward_scale=λ,steps=N,pairing=next|current,quantile=Q|off,ema_decay=D]

Keyword defaults (``parse_method(spec, reward_scale=100.0)``) apply where the spec does not set the option
and the method has it (the application's ``--reward-scale``). Anything else is a :class:`MethodError`.
"""

from __future__ import annotations

import inspect

from .adjoint_matching import AdjointMatchingMethod
from .errors import MethodError
from .onestep import OneStepMethod
from .through_sampler import AlignPropMethod, ContinuousAdjointMethod, ExactMethod, TruncatedMethod

METHODS = {cls.name: cls for cls in (ExactMethod, TruncatedMethod, AlignPropMethod, OneStepMethod,
                                     ContinuousAdjointMethod, AdjointMatchingMethod)}


def _value(text: str):
    """An option's value: int, float, or the string itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _option_names(cls) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]


def parse_method(spec: str, **defaults):
    """The method a spec names, with its options (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise MethodError(f"no fine-tuning method given; use one of {', '.join(METHODS)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower().replace("_", "-")
    if name not in METHODS:
        raise MethodError(f"unknown fine-tuning method {name!r}; use one of {', '.join(METHODS)} "
                          "(options after a colon, e.g. truncated:k=2)")
    cls = METHODS[name]
    allowed = _option_names(cls)
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not value.strip():
            raise MethodError(f"method option {item!r} of {name!r} needs a value: {key}=VALUE")
        if key not in allowed:
            hint = ", ".join(allowed) if allowed else "none"
            raise MethodError(f"method {name!r} has no option {key!r}; its options: {hint}")
        if key in options:
            raise MethodError(f"method option {key!r} of {name!r} is given twice")
        options[key] = _value(value.strip())
    for key, value in defaults.items():
        if key in allowed and key not in options and value is not None:
            options[key] = value
    try:
        return cls(**options)
    except MethodError:
        raise
    except (TypeError, ValueError) as err:
        raise MethodError(f"method {spec!r}: {err}") from None
