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
  (before above after, labelled), ``loss_curve.png``, ``pipeline_call.json`` (the diffusers call that makes
  ``after/``, :mod:`.pipeline_call`) and ``summary.json``;
* ``--out`` is created only once the run starts (an argument error leaves nothing on disk), and an earlier
  run there is refused unless ``resume`` or ``overwrite`` (which removes its outputs first).

The parts live by concern: the task API in :mod:`.task`, the call budget in :mod:`.call_count`, the checkpoint
files in :mod:`.checkpoint`, the outputs in :mod:`.outputs`; this module is the loop itself.

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
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .call_count import CallCounter
from .checks import check_writable
from .checkpoint import CheckpointFolder, atomic_write_json, optimizer_from_files, sharded_optimizer_params, to_json
from .errors import Interrupted, NonFiniteError, UserInputError
from .options import LoopOptions
from .outputs import check_out, plot_loss, prepare_out, run_summary, write_comparison, write_images
from .task import Evaluation, ParamGroup, Task

__all__ = ["CallCounter", "CheckpointFolder", "Evaluation", "LoopConfig", "ParamGroup", "Task", "check_writable", "run"]


@dataclass
class LoopConfig:
    """How :func:`run` runs; the defaults are the command line's (:class:`~.options.LoopOptions`)."""

    out: Path
    iters: int = 30
    budget: int | None = LoopOptions.budget  # model calls (network forward + backward evaluations)
    checkpoint_every: int = LoopOptions.checkpoint_every
    resume: bool = LoopOptions.resume
    overwrite: bool = LoopOptions.overwrite
    on_nonfinite: str = LoopOptions.on_nonfinite  # "stop" or "skip"
    progress: bool = True
    seed: int = LoopOptions.seed

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
    return [k for k in keys if json.dumps(saved.get(k), default=to_json) != json.dumps(current.get(k), default=to_json)]


def run(task: Task, cfg: LoopConfig) -> dict:
    """Optimise ``task`` as ``cfg`` says; write the outputs to ``cfg.out``; return the summary.

    With several processes (``task.dp``) every process calls this; only the main one writes."""
    from tqdm.auto import tqdm

    dp = task.dp
    main = dp.is_main
    out = check_out(cfg.out, cfg.resume, cfg.overwrite) if main else Path(cfg.out).expanduser()
    ckpt = CheckpointFolder(out)
    if cfg.resume and not ckpt.exists():
        raise UserInputError(f"--resume: no checkpoint in {ckpt.folder} (start without --resume)")
    task.out = out
    task.setup()
    groups = task.param_groups()
    replicated = [t for g in groups if not g.sharded for t in g.tensors.values()]
    sharded = [t for g in groups if g.sharded for t in g.tensors.values()]
    opt = task.make_optimizer(groups)
    counter = CallCounter(task.counted_modules())
    settings = json.loads(json.dumps(task.describe(), default=to_json))
    state = {"history": [], "skipped": [], "calls_forward": 0, "calls_backward": 0, "seconds": 0.0,
             "before": None, "before_captions": None, "settings": settings, "seed": cfg.seed}
    iteration = 0
    if main:
        prepare_out(out, cfg.resume, cfg.overwrite)  # (created now: an argument error before leaves nothing)
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
                write_images(ev, out / "before")
            state["before"], state["before_captions"] = ev.metrics, ev.captions

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
        call = task.pipeline_call()
        if call is not None:
            from .pipeline_call import EXTRA_FILE, FILE, write

            if call.get("_extra_tensors"):
                files["pipeline_call_tensors"] = EXTRA_FILE
            files["pipeline_call"] = write(out, call) if main else FILE
        summary = run_summary(task, cfg, state, iteration, reason, ev.metrics, files)
        if main:
            write_images(ev, out / "after")
            write_comparison(out, state["before_captions"], ev)
            plot_loss(state["history"], out / "loss_curve.png", task.name, task.loss_name)
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
    """Load a checkpoint (full tensors) into this process: sharded tensors keep this process's rows, weights
    sharded by FSDP2 (and their optimiser state) this process's shards."""
    from ..fsdp import like
    from ..gradients.sharded import is_sharded

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
                t.copy_(like(t, src))
    rows = sharded_optimizer_params(opt, groups)
    params = [p for group in opt.param_groups for p in group["params"]]

    def reshard(i, val):  # the rows of a sharded parameter's state (the full tensor in the checkpoint)
        p = rows.get(i)
        if p is not None and val.dim() >= 1 and val.dim() == p.dim() and val.shape[1:] == p.shape[1:]:
            return dp.shard(val)
        if i < len(params) and is_sharded([params[i]]) and val.shape == params[i].shape:
            return like(params[i].detach(), val)  # (FSDP2: this process's shard of the weight's state)
        return val

    opt.load_state_dict(optimizer_from_files(tensors, meta["optimizer"], reshard))
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
