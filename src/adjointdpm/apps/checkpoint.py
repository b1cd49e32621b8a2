"""Checkpoint files, written atomically and without pickle.

``DIR/checkpoint/``: ``state-<iteration>.safetensors`` holds every tensor (parameters, optimiser state, task
state, the torch RNG) and ``checkpoint.json`` everything else (iteration, history, settings, the optimiser's
scalars), and names the tensor file. Each file is written to a temporary name, flushed and renamed
(``os.replace``); ``checkpoint.json`` is replaced last, so a crash at any moment leaves the previous
checkpoint readable. With several processes the sharded tensors are gathered (a run resumes on any number of
processes) and only the main process writes; so are the weights FSDP2 shards, and their optimiser state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserInputError
from .task import ParamGroup, Task

CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=to_json) + "\n").encode())


def to_json(o):
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean))


def sharded_optimizer_params(opt: torch.optim.Optimizer, groups: list[ParamGroup]) -> dict[int, torch.Tensor]:
    """{state_dict index: parameter} of the optimiser's parameters that belong to sharded groups."""
    sharded = {id(t) for g in groups if g.sharded for t in g.tensors.values()}
    params = [p for group in opt.param_groups for p in group["params"]]
    return {i: p for i, p in enumerate(params) if id(p) in sharded}


def is_row_state(val, param) -> bool:
    return param is not None and isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape == param.shape


def optimizer_to_files(sd: dict, reshard=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state_dict into tensors (for safetensors) and the JSON rest; ``reshard(idx, val)``
    maps a tensor (e.g. gathers the rows of a sharded parameter's state)."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = val if reshard is None else reshard(idx, val)
            else:
                scalars.setdefault(str(idx), {})[key] = val
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"scalars": scalars, "param_groups": groups}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict, reshard=None) -> dict:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if not name.startswith("optim/"):
            continue
        _, idx, key = name.split("/", 2)
        state.setdefault(int(idx), {})[key] = val if reshard is None else reshard(int(idx), val)
    for idx, vals in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(vals)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


class CheckpointFolder:
    """``DIR/checkpoint/``: ``state-<iteration>.safetensors`` (all tensors) + ``checkpoint.json``."""

    def __init__(self, out: Path):
        self.folder = Path(out) / CHECKPOINT_DIR

    @property
    def index(self) -> Path:
        return self.folder / "checkpoint.json"

    def exists(self) -> bool:
        return self.index.is_file()

    def save(self, iteration: int, groups: list[ParamGroup], opt: torch.optim.Optimizer, task: Task, meta: dict) -> None:
        """Called on every process (sharded tensors are gathered, in the same order everywhere); the main
        process writes."""
        from ..fsdp import full_tensor  # (weights sharded by FSDP2, their optimiser state: the whole tensors)

        dp = task.dp
        tensors: dict[str, torch.Tensor] = {}
        for g in groups:
            for name, t in g.tensors.items():
                tensors[f"param/{g.name}/{name}"] = dp.gather_shards(t) if g.sharded else full_tensor(t.detach())
        for name, t in task.state_tensors().items():
            tensors[f"task/{name}"] = dp.gather_shards(t) if name in task.sharded_state else full_tensor(t)
        tensors["rng/torch"] = torch.get_rng_state()
        rows = sharded_optimizer_params(opt, groups)
        opt_tensors, opt_meta = optimizer_to_files(
            opt.state_dict(), lambda i, v: dp.gather_shards(v) if is_row_state(v, rows.get(i)) else full_tensor(v))
        tensors.update(opt_tensors)
        if not dp.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fname = f"state-{iteration:06d}.safetensors"
        _save_safetensors(self.folder / fname, tensors)
        atomic_write_json(self.index, {"format": FORMAT_VERSION, "iteration": iteration, "tensors": fname,
                                       "optimizer": opt_meta, **meta})
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != fname:
                old.unlink(missing_ok=True)
        # temporary files of a process killed mid-write (never read: checkpoint.json names complete files only)
        for tmp in self.folder.glob(".*.tmp-*"):
            if not tmp.name.endswith(f".tmp-{os.getpid()}"):
                tmp.unlink(missing_ok=True)

    def load(self) -> tuple[dict, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        try:
            meta = json.loads(self.index.read_text())
            tensors = load_file(str(self.folder / meta["tensors"]))
        except (OSError, ValueError, KeyError) as e:
            raise UserInputError(f"cannot read the checkpoint in {self.folder}: {e}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise UserInputError(f"checkpoint {self.index} has format {meta.get('format')}, expected {FORMAT_VERSION}")
        return meta, tensors
