"""The one error the fine-tuning methods raise for bad user input: an unknown method, a bad option, a
method the sampler cannot take, λ ≤ 0, a reward of the wrong shape or without a gradient."""

from __future__ import annotations


class MethodError(ValueError):
    """A fine-tuning method cannot be built or used as given; ``str(err)`` is one line naming the fix."""
