"""The one optimisation loop behind ``guide``, ``audit``, ``stylize`` and ``invert``.

An application is a :class:`Task`: named parameter groups (x_T, embeddings, weights), a loss that calls
the engine, an optional projection after each step, and an evaluation of the current state. The loop
does everything else, identically for all four:

* progress bar; the optimiser step; a budget counted in model calls (every forward and every backward
  evaluation of the network, counted by hooks, so every gradient mode is charged what it really costs);
* non-finite loss or gradient detected at the iteration it appears, reported with the parameter group
  and tensor; ``on_nonfinite="stop"`` saves the last good state and stops, ``"skip"`` drops the step;
* a checkpoint every K iterations, on SIGINT and at the end: tensors (parameters, optimiser state,
  task state, RNG) in one safetensors file, everything else in JSON, written atomically (temporary
  file + ``os.replace``; ``checkpoint.json`` names the tensor file and is replaced last, so a crash
  at any point leaves the previous checkpoint readable); no pickle anywhere;
* ``resume=True`` continues from the checkpoint and gives the same result as an uninterrupted run:
  each iteration draws its randomness from a generator seeded by (seed, iteration), and the optimiser,
  parameters and task state are restored exactly;
* outputs: ``before/`` and ``after/`` (one PNG per image plus ``grid.png``), ``comparison.png``
  (before above after), ``loss_curve.png`` and ``summary.json``.

Several processes (``task.dp``, a :class:`~adjointdpm.distributed.DataParallel`; see the ``Scale-out``
section of the README). Parameter groups are *replicated* (weights, a shared embedding: every process
back-propagates its shard of the batch, the gradients are summed across processes before the step, so
the copies stay identical) or *sharded* (one row per sample, e.g. the noises: each process optimises its
own rows, no gradient communication). The processes stay in step through a few scalars per iteration
(loss, non-finite and Ctrl-C flags, model calls: the largest count of any process); checkpoints hold the
gathered full tensors (a run resumes on any number of processes) and only the main process writes to
``--out``. With one process every one of these calls is the identity.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distributed import SingleProcess
from .errors import Interrupted, NonFiniteError, UserInputError

CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------- task API
@dataclass
class ParamGroup:
    """Tensors optimised together (one optimiser parameter group); ``options`` are its optimiser
    settings (lr, weight_decay, …). ``sharded``: one row per sample, split across processes (each
    optimises its own rows); otherwise replicated (gradients summed across processes)."""

    name: str
    tensors: dict[str, torch.Tensor]
    options: dict = field(default_factory=dict)
    sharded: bool = False


@dataclass
class Evaluation:
    """Images (B, C, H, W) in [-1, 1] of one state, and its metrics (JSON-able)."""

    images: torch.Tensor
    metrics: dict
    nrow: int | None = None


class Task:
    """An application: what is optimised, the loss, and how a state is evaluated."""

    name = "task"
    dp = SingleProcess()  # the processes the task is spread over (set from the session by multi-process tasks)
    sharded_state: tuple[str, ...] = ()  # names of state_tensors() that hold one row per sample (sharded)

    def describe(self) -> dict:
        """JSON-able settings that define the run (checked on --resume, written to summary.json)."""
        raise NotImplementedError

    def setup(self) -> None:
        """Build the fixed data of the run (noises, targets, …); called once, before anything else."""

    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def make_optimizer(self, groups: list[ParamGroup]) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": list(g.tensors.values()), **g.options} for g in groups])

    def compute_loss(self, iteration: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The scalar loss to back-propagate and a dict of scalars to log."""
        raise NotImplementedError

    def before_step(self, iteration: int) -> None:
        """After backward, before the optimiser step (e.g. zero the gradients of finished samples)."""

    def after_step(self, iteration: int) -> None:
        """After the optimiser step, without grad (e.g. projection onto a constraint set)."""

    def evaluate(self, stage: str) -> Evaluation:
        """Images and metrics of the current state; ``stage`` is "before" or "after"."""
        raise NotImplementedError

    def finished(self) -> bool:
        """True when there is nothing left to optimise (e.g. every attacked sample succeeded)."""
        return False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Task state other than the parameters that a resumed run needs (e.g. a 'done' mask)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def counted_modules(self) -> list[torch.nn.Module]:
        """Networks whose calls count towards the budget (the denoiser)."""
        return []

    def summarize(self, before: dict, after: dict) -> dict:
        """Extra summary entries derived from the before/after metrics."""
        return {}

    def write_artifacts(self, out: Path) -> dict:
        """Write task outputs (learned weights, embedding, …); return {name: relative path}. Called on
        every process (it may gather); only the main process (``self.dp.is_main``) writes."""
        return {}


@dataclass
class LoopConfig:
    out: Path
    iters: int = 30
    budget: int | None = None  # model calls (network forward + backward evaluations)
    checkpoint_every: int = 5
    resume: bool = False
    on_nonfinite: str = "stop"  # or "skip"
    progress: bool = True
    seed: int = 0

    def __post_init__(self):
        self.out = Path(self.out)
        if self.on_nonfinite not in ("stop", "skip"):
            raise UserInputError(f"--on-nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.iters < 0:
            raise UserInputError(f"--iters must be >= 0, got {self.iters}")
        if self.checkpoint_every < 1:
            raise UserInputError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.budget is not None and self.budget < 1:
            raise UserInputError(f"--budget must be >= 1 model call, got {self.budget}")


# ------------------------------------------------------------------------------ model-call count
class CallCounter:
    """Counts forward calls of the given networks and the backward passes through their outputs."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.forward = 0
        self.backward = 0
        self.enabled = True
        # forwards are counted when they start: a checkpoint's recomputation stops early, before the
        # forward returns, and must still be charged
        self._handles = [m.register_forward_pre_hook(self._on_call) for m in modules]
        self._handles += [m.register_forward_hook(self._on_forward) for m in modules]

    def _on_call(self, module, args):
        if self.enabled:
            self.forward += 1

    def _on_forward(self, module, args, output):
        if not self.enabled:
            return
        out = output
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        out = getattr(out, "sample", out)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._on_backward)

    def _on_backward(self, grad):
        if self.enabled:
            self.backward += 1

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @contextmanager
    def paused(self):
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ------------------------------------------------------------------------------------ file I/O
def check_writable(out: Path) -> Path:
    """Create ``out`` and check a file can be written there; one clear error otherwise."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserInputError(f"cannot write to --out {out}: {reason}") from None
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
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


def _sharded_optimizer_params(opt: torch.optim.Optimizer, groups: list[ParamGroup]) -> dict[int, torch.Tensor]:
    """{state_dict index: parameter} of the optimiser's parameters that belong to sharded groups."""
    sharded = {id(t) for g in groups if g.sharded for t in g.tensors.values()}
    params = [p for group in opt.param_groups for p in group["params"]]
    return {i: p for i, p in enumerate(params) if id(p) in sharded}


def _is_row_state(val, param) -> bool:
    return param is not None and isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape == param.shape


def _optimizer_to_files(sd: dict, reshard=None) -> tuple[dict[str, torch.Tensor], dict]:
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


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict, reshard=None) -> dict:
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


class Checkpoint:
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
        dp = task.dp
        tensors: dict[str, torch.Tensor] = {}
        for g in groups:
            for name, t in g.tensors.items():
                tensors[f"param/{g.name}/{name}"] = dp.gather_shards(t) if g.sharded else t
        for name, t in task.state_tensors().items():
            tensors[f"task/{name}"] = dp.gather_shards(t) if name in task.sharded_state else t
        tensors["rng/torch"] = torch.get_rng_state()
        rows = _sharded_optimizer_params(opt, groups)
        opt_tensors, opt_meta = _optimizer_to_files(
            opt.state_dict(), lambda i, v: dp.gather_shards(v) if _is_row_state(v, rows.get(i)) else v)
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


# ------------------------------------------------------------------------------------ the loop
def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The RNG of one iteration: a function of (seed, iteration) only, so resuming reproduces it."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(iteration)) % (2**63 - 1))


def first_nonfinite(groups: list[ParamGroup], attr: str = "grad") -> tuple[str, str] | None:
    """(group, tensor name) of the first tensor whose .grad (or value) is NaN/inf."""
    for g in groups:
        for name, t in g.tensors.items():
            v = t.grad if attr == "grad" else t
            if v is not None and not bool(torch.isfinite(v).all()):
                return g.name, name
    return None


class _SigintGuard:
    """First SIGINT: finish the iteration, save, stop. Second SIGINT: stop at once (KeyboardInterrupt)."""

    def __init__(self, repeat_window: float = 0.0):
        self.requested = False
        self._old = None
        # several processes: a terminal's Ctrl-C reaches every process and the launcher forwards it once
        # more; a repeat within this many seconds is the same Ctrl-C
        self.repeat_window = repeat_window
        self._first = 0.0

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first < self.repeat_window:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first = time.monotonic()
        print("\ninterrupt: finishing this iteration and saving a checkpoint (press Ctrl-C again to abort)",
              flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _compatible(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if json.dumps(saved.get(k), default=_json_default) != json.dumps(current.get(k), default=_json_default)]


def run(task: Task, cfg: LoopConfig) -> dict:
    """Optimise ``task`` as ``cfg`` says; write the outputs to ``cfg.out``; return the summary.

    With several processes (``task.dp``) every process calls this; only the main one writes."""
    from tqdm.auto import tqdm

    dp = task.dp
    main = dp.is_main
    out = check_writable(cfg.out) if main else Path(cfg.out).expanduser()
    ckpt = Checkpoint(out)
    if cfg.resume and not ckpt.exists():
        raise UserInputError(f"--resume: no checkpoint in {ckpt.folder} (start without --resume)")
    task.setup()
    groups = task.param_groups()
    replicated = [t for g in groups if not g.sharded for t in g.tensors.values()]
    sharded = [t for g in groups if g.sharded for t in g.tensors.values()]
    opt = task.make_optimizer(groups)
    counter = CallCounter(task.counted_modules())
    settings = json.loads(json.dumps(task.describe(), default=_json_default))
    state = {"history": [], "skipped": [], "calls_forward": 0, "calls_backward": 0, "seconds": 0.0,
             "before": None, "settings": settings, "seed": cfg.seed}
    iteration = 0
    try:
        if cfg.resume:
            meta, tensors = ckpt.load()
            diff = _compatible({**meta["settings"], "seed": meta["seed"]}, {**settings, "seed": cfg.seed})
            if diff:
                raise UserInputError(
                    f"--resume: the checkpoint in {ckpt.folder} was made with different settings ({', '.join(diff)}); "
                    "use the same options, or another --out")
            _restore(groups, opt, task, meta, tensors)
            iteration = int(meta["iteration"])
            state.update({k: meta[k] for k in state if k in meta})
            counter.forward, counter.backward = state["calls_forward"], state["calls_backward"]
        if state["before"] is None:
            with counter.paused(), torch.no_grad():
                ev = task.evaluate("before")
            if main:
                _write_images(ev, out / "before")
            state["before"] = ev.metrics

        last_cost = None
        reason = "iterations"
        bar = tqdm(total=cfg.iters, initial=min(iteration, cfg.iters), desc=task.name, unit="it",
                   disable=not (cfg.progress and main), dynamic_ncols=True, mininterval=0.5)
        with _SigintGuard(repeat_window=2.0 if dp.world_size > 1 else 0.0) as sigint:
            while iteration < cfg.iters:
                if dp.all(task.finished()):
                    reason = "finished"
                    break
                total = state["calls_forward"] + state["calls_backward"]
                if cfg.budget is not None and last_cost is not None and total + last_cost > cfg.budget:
                    reason = "budget"
                    break
                t0, forward0, backward0 = time.perf_counter(), counter.forward, counter.backward
                opt.zero_grad(set_to_none=True)
                problem = None
                try:
                    loss, logs = task.compute_loss(iteration, iteration_generator(cfg.seed, iteration))
                    if not bool(torch.isfinite(loss.detach()).all()):
                        problem = (None, None, f"the loss is {loss.item()}")
                    elif loss.requires_grad:  # (the one-step baseline back-propagates step by step itself)
                        loss.backward()
                except FloatingPointError as e:  # raised by the engine at the sampling step where it appears
                    problem = (None, None, str(e).split(";")[0])
                if dp.world_size > 1:
                    dp.all_reduce_gradients(replicated)  # every process, also one with a problem (a collective)
                    for t in sharded:  # rows without a sample to back-propagate get a zero gradient, as in one process
                        if t.grad is None and t.requires_grad:
                            t.grad = torch.zeros_like(t)
                if problem is None:
                    bad = first_nonfinite(groups)
                    if bad is not None:
                        problem = (*bad, "non-finite gradient")
                loss_value, elsewhere, calls, stop = _sync(dp, loss if problem is None else None, problem is not None,
                                                           (counter.forward - forward0, counter.backward - backward0),
                                                           sigint.requested)
                state["calls_forward"] += calls[0]
                state["calls_backward"] += calls[1]
                if problem is None and elsewhere:
                    problem = (None, None, "a non-finite loss or gradient in another process")
                if problem is not None:
                    if cfg.on_nonfinite == "stop":
                        _stop_nonfinite(problem, iteration, groups, opt, task, ckpt, state)
                    state["skipped"].append({"iteration": iteration, "group": problem[0], "tensor": problem[1],
                                             "reason": problem[2]})
                    opt.zero_grad(set_to_none=True)
                    if main:
                        bar.write(f"iteration {iteration}: {_describe(problem)}; step skipped")
                    loss_value, logs = float("nan"), {}
                else:
                    task.before_step(iteration)
                    opt.step()
                    with torch.no_grad():
                        task.after_step(iteration)
                iteration += 1
                last_cost = calls[0] + calls[1]
                state["seconds"] += time.perf_counter() - t0
                total = state["calls_forward"] + state["calls_backward"]
                state["history"].append({"iteration": iteration, "loss": loss_value, "calls": total,
                                         "seconds": round(state["seconds"], 3),
                                         **{k: float(v) for k, v in logs.items()}})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4g}", calls=total)
                if stop:
                    ckpt.save(iteration, groups, opt, task, state)
                    bar.close()
                    raise Interrupted(f"interrupted after iteration {iteration}: checkpoint saved in {ckpt.folder}; "
                                      "continue with --resume")
                if iteration % cfg.checkpoint_every == 0:
                    ckpt.save(iteration, groups, opt, task, state)
        bar.close()
        ckpt.save(iteration, groups, opt, task, state)
        with counter.paused(), torch.no_grad():
            ev = task.evaluate("after")
        files = task.write_artifacts(out)
        summary = _summary(task, cfg, state, iteration, reason, ev.metrics, files)
        if main:
            _write_images(ev, out / "after")
            _write_comparison(out, state["before"], ev)
            _plot_loss(state["history"], out / "loss_curve.png", task.name)
            atomic_write_json(out / "summary.json", summary)
        return summary
    finally:
        counter.remove()


def _sync(dp, loss, problem: bool, calls: tuple[int, int], interrupt: bool):
    """What the processes agree on after each iteration: (loss, a problem anywhere, model calls, stop).

    The loss is the sum of the processes' losses (each is its shard's share of the global loss); the
    model calls of the iteration are the largest count of any process (they run side by side)."""
    if dp.world_size == 1:
        return (float(loss.detach()) if loss is not None else float("nan")), problem, calls, interrupt
    value = float(loss.detach()) if loss is not None else 0.0
    row = torch.tensor([[value, float(problem), float(calls[0]), float(calls[1]), float(interrupt)]],
                       dtype=torch.float64, device=dp.device)
    rows = dp.gather(row).cpu()
    total_calls = (int(rows[:, 2].max()), int(rows[:, 3].max()))
    return float(rows[:, 0].sum()), bool(rows[:, 1].any()), total_calls, bool(rows[:, 4].any())


def _restore(groups, opt, task, meta, tensors) -> None:
    """Load a checkpoint (full tensors) into this process: sharded tensors keep this process's rows."""
    dp = task.dp
    with torch.no_grad():
        for g in groups:
            for name, t in g.tensors.items():
                key = f"param/{g.name}/{name}"
                src = tensors.get(key)
                if src is not None and g.sharded and src.dim() >= 1:
                    src = dp.shard(src)
                if src is None or src.shape != t.shape:
                    raise UserInputError(f"--resume: the checkpoint has no tensor {key} of shape {tuple(t.shape)}")
                t.copy_(src)
    rows = _sharded_optimizer_params(opt, groups)

    def reshard(i, val):  # the rows of a sharded parameter's state (the full tensor in the checkpoint)
        p = rows.get(i)
        if p is not None and val.dim() >= 1 and val.dim() == p.dim() and val.shape[1:] == p.shape[1:]:
            return dp.shard(val)
        return val

    opt.load_state_dict(_optimizer_from_files(tensors, meta["optimizer"], reshard))
    task.load_state_tensors({k[5:]: (dp.shard(v) if k[5:] in task.sharded_state else v)
                             for k, v in tensors.items() if k.startswith("task/")})
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])


def _describe(problem) -> str:
    group, tensor, what = problem
    return what if group is None else f"{what} in parameter group {group!r} (tensor {tensor!r})"


def _stop_nonfinite(problem, iteration, groups, opt, task, ckpt, state):
    if not task.dp.any(first_nonfinite(groups, attr="value") is not None):
        opt.zero_grad(set_to_none=True)
        ckpt.save(iteration, groups, opt, task, state)
        saved = f"the last good state (iteration {iteration}) is saved in {ckpt.folder}"
    elif ckpt.exists():
        saved = f"the last good checkpoint is in {ckpt.folder}"
    else:
        saved = "no good checkpoint exists yet"
    raise NonFiniteError(
        f"iteration {iteration}: {_describe(problem)}; stopped, {saved}; "
        "lower the learning rate, or pass --on-nonfinite skip")


def _write_images(ev: Evaluation, folder: Path) -> None:
    from ..images import save_images

    save_images(ev.images, folder, nrow=ev.nrow)


def _write_comparison(out: Path, before_metrics: dict, after: Evaluation) -> None:
    """``comparison.png``: the before grid above the after grid (both read back from disk)."""
    import numpy as np
    from PIL import Image

    try:
        top = np.asarray(Image.open(out / "before" / "grid.png"))
        bottom = np.asarray(Image.open(out / "after" / "grid.png"))
    except OSError:
        return
    if top.ndim != bottom.ndim:
        return
    width = max(top.shape[1], bottom.shape[1])

    def pad(a):
        p = np.full((a.shape[0], width) + a.shape[2:], 255, dtype=np.uint8)
        p[:, : a.shape[1]] = a
        return p

    gap = np.full((8, width) + top.shape[2:], 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([pad(top), gap, pad(bottom)])).save(out / "comparison.png")


def _finite_losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if math.isfinite(h["loss"])]


def _summary(task, cfg, state, iteration, reason, after, files) -> dict:
    losses = _finite_losses(state["history"])
    return {
        "task": task.name,
        "settings": state["settings"],
        "seed": cfg.seed,
        "iterations": iteration,
        "stopped_by": reason,
        "budget": cfg.budget,
        "model_calls": {"forward": state["calls_forward"], "backward": state["calls_backward"],
                        "total": state["calls_forward"] + state["calls_backward"]},
        "seconds": round(state["seconds"], 2),
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "min": min(losses) if losses else None, "history": state["history"]},
        "skipped_steps": state["skipped"],
        "before": state["before"],
        "after": after,
        **task.summarize(state["before"], after),
        "files": {"before": "before/", "after": "after/", "comparison": "comparison.png",
                  "loss_curve": "loss_curve.png", "checkpoint": f"{CHECKPOINT_DIR}/", **files},
    }


def _plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    its = [h["iteration"] for h in history if math.isfinite(h["loss"])]
    ax.plot(its, _finite_losses(history), marker="o", ms=2.5, lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    calls = history[-1]["calls"] if history else 0
    ax.set_title(f"{title}: loss ({calls} model calls)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
