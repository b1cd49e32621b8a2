"""Conditioning as a tree: a tensor, or a dict of the network's keyword arguments (nested dicts allowed).

``cond`` / ``uncond`` of :func:`adjointdpm.sample` are either a tensor (``encoder_hidden_states``) or a dict
such as SDXL's ``{"encoder_hidden_states": E, "added_cond_kwargs": {"text_embeds": P, "time_ids": T}}``.
The engine needs three things from such a tree:

* its floating tensors, in a fixed order (``floating_leaves``), and the same tree with them replaced
  (``replace_floating``): the gradient modes differentiate every floating tensor with ``requires_grad``,
  at any depth, by passing them to autograd as separate inputs;
* the batched form for one network call (``batch_tree``): every tensor with a batch dimension of 1 is
  expanded to the sample batch B, differentiably;
* the classifier-free-guidance pair (``guidance_pair``): one call on 2B rows, [uncond; cond]. A key present
  in both trees is batched from both; a key only in ``cond`` is shared by both halves ([c; c]); keys listed
  in ``unbatched`` (positional ids without a batch dimension, e.g. Flux's ``txt_ids`` / ``img_ids``) and
  non-tensor values are passed once, as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

Tree = Any  # a tensor, None, a non-tensor value, or a dict of trees


def _is_floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def floating_leaves(tree: Tree) -> list[torch.Tensor]:
    """The floating-point tensors of ``tree``, depth first, in dict order."""
    if _is_floating(tree):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in floating_leaves(value)]
    return []


def replace_floating(tree: Tree, leaves: Iterator[torch.Tensor] | list[torch.Tensor]) -> Tree:
    """``tree`` with its floating tensors replaced, in ``floating_leaves`` order, by ``leaves``."""
    return _replace(tree, iter(leaves))


def _replace(tree: Tree, leaves: Iterator[torch.Tensor]) -> Tree:
    if _is_floating(tree):
        return next(leaves)
    if isinstance(tree, dict):
        return {key: _replace(value, leaves) for key, value in tree.items()}
    return tree


def map_floating(fn: Callable[[torch.Tensor], torch.Tensor], tree: Tree) -> Tree:
    return replace_floating(tree, [fn(leaf) for leaf in floating_leaves(tree)])


def tensors_with_paths(tree: Tree, prefix: str = "", key: str | None = None) -> Iterator[tuple[str, str | None, torch.Tensor]]:
    """(name, key, tensor) for every tensor of the tree, named like cond["added_cond_kwargs"]["time_ids"]; key is
    its innermost dict key (None for a tensor tree)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, key, tree
    elif isinstance(tree, dict):
        for k, value in tree.items():
            yield from tensors_with_paths(value, f"{prefix}[{k!r}]", k)


def _expand(value: torch.Tensor, batch: int) -> torch.Tensor:
    if value.ndim == 0 or value.shape[0] == batch:
        return value
    return value.expand(batch, *value.shape[1:])


def batch_tree(tree: Tree, batch: int, unbatched: frozenset[str] = frozenset()) -> Tree:
    """Every batched tensor of ``tree`` with its batch-1 dimension expanded to ``batch``."""
    if isinstance(tree, torch.Tensor):
        return _expand(tree, batch)
    if isinstance(tree, dict):
        return {k: v if k in unbatched else batch_tree(v, batch, unbatched) for k, v in tree.items()}
    return tree


def guidance_pair(uncond: Tree, cond: Tree, batch: int, unbatched: frozenset[str] = frozenset()) -> Tree:
    """The conditioning of one network call on [x; x]: [uncond; cond] along the batch dimension."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise TypeError(f"cond is a tensor but uncond is {type(uncond).__name__}; give both as tensors")
        return torch.cat([_expand(uncond, batch), _expand(cond, batch)])
    if isinstance(cond, dict):
        uncond = {} if uncond is None else uncond
        if not isinstance(uncond, dict):
            raise TypeError(f"cond is a dict but uncond is {type(uncond).__name__}; give uncond the same structure")
        out = {}
        for key, value in cond.items():
            if key in unbatched or not isinstance(value, (torch.Tensor, dict)):
                out[key] = value
            else:
                out[key] = guidance_pair(uncond.get(key, value), value, batch, unbatched)
        return out
    return cond


def batch_size(tree: Tree, unbatched: frozenset[str] = frozenset()) -> int:
    """The largest leading dimension of the batched tensors of ``tree`` (1 if none)."""
    if isinstance(tree, torch.Tensor):
        return int(tree.shape[0]) if tree.ndim >= 1 else 1
    if isinstance(tree, dict):
        return max([batch_size(v, unbatched) for k, v in tree.items() if k not in unbatched] or [1])
    return 1
