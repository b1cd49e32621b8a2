"""Memory budgets of the exact adjoint: sizes, the size of one step's autograd graph, which steps to keep.

``Exact(memory=B)`` keeps the autograd graph of some sampling steps from the forward pass instead of
recomputing them in the backward pass. The choice (``steps_to_keep``):

* Cost of a step = its network calls (``solver.model_calls_per_step``; Heun's final step into the clean
  sample is one call):
  every call runs the same network on the same shapes, so a step's recompute time and the size of its
  graph are both proportional to its calls. Size per call = the saved activations of step 0's graph,
  measured while it is built (``SavedActivations``), divided by its calls.
* The recompute time saved per byte kept is then the same for every step, so the time saved is largest
  when the kept steps' calls are as many as fit in B. Among such choices the last steps are kept (a
  suffix of the sampler): the backward pass consumes them first, so their memory is free again before
  the first recomputation — the peak stays near max(B, one step) instead of B + one step. (With Heun's
  two-call steps a suffix may leave one call's worth of the budget unused.)

Sizes are bytes: an int/float, ``float("inf")`` (keep every step), or a string such as "8GiB", "512MiB",
"1.5GB" (IEC units are powers of 1024, SI units powers of 1000).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_HOW = ("give bytes (e.g. 8e9), a string such as '8GiB', '512MiB' or '1.5GB', float('inf') to keep every "
        "step's graph, or None to recompute every step")


def parse_memory(value) -> float | None:
    """A memory size in bytes (float; ``inf`` allowed), or None. Raises ValueError/TypeError on bad input."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"memory={value!r} ({type(value).__name__}) is not a size; {_HOW}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "infinity", "unlimited"):
            return math.inf
        match = _SIZE.match(text)
        if not match or match.group(2) not in UNITS:
            raise ValueError(f"memory={value!r} is not a size; {_HOW}")
        value = float(match.group(1)) * UNITS[match.group(2)]
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"memory={value!r} must be a size ≥ 0; {_HOW}")
    return value


def format_bytes(n: float) -> str:
    if math.isinf(n):
        return "inf"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


class SavedActivations:
    """Context manager counting the bytes autograd saves for the backward pass while a graph is built.

    Counted: the distinct storages of saved tensors that autograd computed (non-leaf tensors, or views of
    them: the activations). Not counted: leaves and their views — the weights (and a weight's transpose),
    the step's inputs, tensors computed without grad."""

    def __init__(self):
        self.bytes = 0
        self._seen: set[tuple[str, int]] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._is_view() else tensor  # a weight's transpose is the weight
        if base is not None and base.grad_fn is not None:
            try:
                storage = tensor.untyped_storage()
                key = (str(tensor.device), storage.data_ptr())
                if key not in self._seen:
                    self._seen.add(key)
                    self.bytes += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage
                pass
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def network_calls(solver, step: int) -> int:
    """Network calls of one sampler step: the solver's calls per step, but one for a multi-call solver's
    final step into the clean sample (Heun's last step is Euler, as diffusers')."""
    calls = int(getattr(solver, "model_calls_per_step", 1))
    sigma_at = getattr(solver.grid, "sigma_at", None)
    if calls > 1 and step == solver.num_steps - 1 and (sigma_at is None or sigma_at(step + 1) == 0.0):
        return 1
    return calls


def steps_to_keep(calls: Sequence[int], bytes_per_call: float, budget: float) -> int:
    """The first step of the longest suffix of steps whose graphs fit in ``budget`` (len(calls) = none)."""
    first, total = len(calls), 0.0
    for i in reversed(range(len(calls))):
        total += bytes_per_call * calls[i]
        if total > budget:
            break
        first = i
    return first
