"""Prompt conditioning in the applications: a tensor (SD 1.x/2.x, the embedded model) or a dict of the
network's keyword arguments (SDXL, SD3, Flux, PixArt), treated alike.

A batch of conditionings is indexed by rows (one per sample), sharded over processes, detached, and — for
the tasks that optimise it (invert, guide with ``--optimize-cond``) — made trainable: the trainable part
is the prompt embeddings (``encoder_hidden_states`` and the pooled embeddings), never ids, masks or
micro-conditioning. Saved embeddings use the names the family's pipeline takes (``prompt_embeds=``,
``pooled_prompt_embeds=``, ``negative_prompt_embeds=``, …).
"""

from __future__ import annotations

import torch

from ..conditioning import batch_size, map_floating
from ..model import UNBATCHED_KEYS

#: conditioning keys that are embeddings of the prompt (trainable), with the pipeline argument that takes them
EMBEDDINGS = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds",
              "text_embeds": "pooled_prompt_embeds"}


def count(cond) -> int:
    return batch_size(cond, UNBATCHED_KEYS)


def rows(cond, index):
    """Rows ``index`` (a slice, or a tensor of row indices) of a conditioning batch (a dict's batch-1 tensors
    are shared by every row and kept whole)."""
    if isinstance(cond, torch.Tensor):
        return cond[index]
    return _map_batched(cond, lambda t: t if t.shape[0] == 1 else t[index])


def shard(dp, cond):
    """This process's rows of a conditioning batch."""
    if isinstance(cond, torch.Tensor):
        return dp.shard(cond)
    return _map_batched(cond, dp.shard)


def detached(cond):
    return map_floating(torch.Tensor.detach, cond)


def trainable(cond, requires_grad: bool = True):
    """A copy of ``cond`` whose prompt embeddings are fresh leaves with ``requires_grad``, and those leaves
    by name (for an optimiser's parameter group)."""
    if isinstance(cond, torch.Tensor):
        leaf = cond.detach().clone().requires_grad_(requires_grad)
        return leaf, {"cond": leaf}
    leaves = {}

    def copy(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = copy(value, f"{prefix}{key}.")
            elif key in EMBEDDINGS and isinstance(value, torch.Tensor) and value.is_floating_point():
                out[key] = leaves.setdefault(prefix + key, value.detach().clone().requires_grad_(requires_grad))
            else:
                out[key] = value
        return out

    return copy(cond), leaves


def embeddings(cond) -> list[torch.Tensor]:
    """The prompt-embedding tensors of ``cond`` (the trainable part), in a fixed order."""
    return list(trainable_view(cond).values())


def trainable_view(cond) -> dict[str, torch.Tensor]:
    if isinstance(cond, torch.Tensor):
        return {"cond": cond}
    found = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif key in EMBEDDINGS and isinstance(value, torch.Tensor):
                found[prefix + key] = value
    walk(cond)
    return found


def relative_change(cond, cond0) -> float:
    """‖c − c₀‖/‖c₀‖ over all prompt embeddings."""
    num = sum(float((a.detach() - b).pow(2).sum()) for a, b in zip(embeddings(cond), embeddings(cond0)))
    den = sum(float(b.pow(2).sum()) for b in embeddings(cond0))
    return (num / max(den, 1e-24)) ** 0.5


def pipeline_tensors(cond, negative=None) -> dict[str, torch.Tensor]:
    """The embeddings under the names the pipeline's ``__call__`` takes (CPU, contiguous)."""
    out = {}
    for prefix, tree in (("", cond), ("negative_", negative)):
        if tree is None:
            continue
        for name, t in trainable_view(tree).items():
            key = "prompt_embeds" if name == "cond" else EMBEDDINGS[name.rsplit(".", 1)[-1]]
            out[prefix + key] = t.detach().cpu().contiguous()
    return out


def _map_batched(tree, fn):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _map_batched(value, fn)
        elif isinstance(value, torch.Tensor) and key not in UNBATCHED_KEYS and value.ndim >= 1:
            out[key] = fn(value)
        else:
            out[key] = value
    return out
