"""The CPU sweep behind ``python -m adjointdpm.bench grad`` and ``python -m adjointdpm.bench cpu``: every
gradient method × solver × number of steps N, on one or more models.

For each (model, solver, N) the orchestrator starts, each in a fresh process (forked from a helper that has
only imported the libraries, see ``zygote.py``):

1. ``reference``: the float64 gradient by autograd back-propagation (checkpointed per step; the smallest
   N also runs plain float64 back-propagation and records how far the two are apart).
2. ``timing``: float32, one warm-up, then R rounds over plain sampling and every method in rotating
   order (so a change of machine load hits every method alike). Per method the fastest of the R rounds
   and of the memory process's measured call is reported; every sample is kept in the JSON. The first round's gradients are compared with the
   reference (relative error and cosine, per group: x_T, text embeddings = cond ⊕ uncond, weights).
3. ``memory``: one process per method: peak RSS of one gradient computation above the RSS just before it
   (see ``common.PeakRSS``), on the first call after a one-network-call warm-up. With ``mmap_threshold``
   glibc gives every allocation of at least that size its own pages (returned on free), so the peak
   tracks live tensors rather than the heap's reuse (slower: such runs are not timing samples).

Times are wall-clock (what a user waits) and process CPU time (user + system, all threads): on a shared
machine the second is far less sensitive to other processes' load.

A method whose memory at the next N is projected (linearly from the previous N) above ``mem_limit`` is
skipped at that N and the JSON says so. Ratios (time(exact)/time(backprop), time(grad)/time(forward),
peak(N_max)/peak(N_min)) are computed from the one run.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import ModelSpec, PeakRSS, build_setup, compare, loadavg, machine_info, parameter_count, rss_mib
from .modes import forward_kind, run_mode, supports
from .zygote import Zygote

GROUPS = ("x_T", "text", "weights")


# ---------------------------------------------------------------------------------------------------
# one gradient computation
# ---------------------------------------------------------------------------------------------------


def _leaves(setup, wrt):
    x_T = setup.x_T.clone().requires_grad_("x_T" in wrt)
    cond = setup.cond.clone().requires_grad_("text" in wrt)
    uncond = None if setup.uncond is None else setup.uncond.clone().requires_grad_("text" in wrt)
    for p in setup.model.parameters():
        p.requires_grad_("weights" in wrt)
        p.grad = None
    return x_T, cond, uncond


def grouped_gradients(setup, x_T, cond, uncond, wrt) -> dict:
    """After ``loss.backward()`` from the leaves of :func:`_leaves`: the gradients by group ("x_T", "text":
    cond then uncond flattened, "weights": every parameter flattened, zeros where unreached)."""
    text = None
    if cond.grad is not None:
        text = cond.grad.flatten() if uncond is None else torch.cat([cond.grad.flatten(), uncond.grad.flatten()])
    weights = None
    if "weights" in wrt:
        weights = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in setup.model.parameters()
        ])
    return {"x_T": x_T.grad, "text": text, "weights": weights}


def gradient(setup, mode: str, solver: str, steps: int, wrt) -> dict:
    """One gradient of L = mean((x_0 − target)²) for ``mode``; returns the gradients by group.

    For the plain sampling modes ("forward", "forward_edict") nothing is differentiated.
    """
    if mode.startswith("forward"):
        with torch.no_grad():
            run_mode(mode, setup, solver, steps, setup.x_T, setup.cond, setup.uncond)
        return {}
    x_T, cond, uncond = _leaves(setup, wrt)
    x0 = run_mode(mode, setup, solver, steps, x_T, cond, uncond)
    loss = (x0 - setup.target).square().mean()
    loss.backward()
    return {**grouped_gradients(setup, x_T, cond, uncond, wrt), "loss": loss.item()}


def optimiser_step(setup, grads_present: bool, wrt, lr: float = 1e-2) -> float:
    """Seconds for the AdamW update that would follow the gradient (x_T, embeddings and/or weights).

    The benchmark's tensors are put back afterwards, so every method sees the same point."""
    if not grads_present:
        return 0.0
    params = [p for p in setup.model.parameters() if p.grad is not None] if "weights" in wrt else []
    saved = [p.detach().clone() for p in params]
    start = time.perf_counter()
    opt = torch.optim.AdamW(params, lr=lr) if params else None
    if opt is not None:
        opt.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return elapsed


# ---------------------------------------------------------------------------------------------------
# worker jobs (each runs in its own process)
# ---------------------------------------------------------------------------------------------------


def _warm_up(setup, solver):
    """One network call without and one with a graph (and its backward), so the measured call does not
    pay for one-off initialisation (kernels, autograd's engine); freed memory is trimmed before measuring."""
    with torch.no_grad():
        run_mode("forward", setup, solver, 1, setup.x_T, setup.cond, setup.uncond)
    x = setup.x_T.clone().requires_grad_()
    run_mode("backprop", setup, solver, 1, x, setup.cond, setup.uncond).sum().backward()


def job_reference(job: dict) -> dict:
    spec = ModelSpec.from_json(job["spec"])
    setup = build_setup(spec, torch.float64)
    edict = job["family"] == "edict"
    start = time.perf_counter()
    grads = gradient(setup, "reference_edict" if edict else "reference", job["solver"], job["steps"], job["wrt"])
    out = {"seconds": time.perf_counter() - start}
    if job.get("check_backprop"):
        plain = gradient(setup, "reference_edict_backprop" if edict else "reference_backprop", job["solver"],
                         job["steps"], job["wrt"])
        out["reference_check"] = {g: compare(grads[g], plain[g]) for g in GROUPS if grads.get(g) is not None}
    torch.save({g: grads[g] for g in GROUPS if grads.get(g) is not None}, job["path"])
    return out


def job_timing(job: dict) -> dict:
    spec = ModelSpec.from_json(job["spec"])
    torch.manual_seed(0)
    setup = build_setup(spec, torch.float32)
    solver, steps, wrt, modes = job["solver"], job["steps"], job["wrt"], job["modes"]
    refs = {fam: torch.load(path, weights_only=True) for fam, path in job["references"].items() if path and os.path.exists(path)}
    _warm_up(setup, solver)
    times = {m: [] for m in modes}
    cpu_times = {m: [] for m in modes}
    step_times = {m: [] for m in modes}
    errors, losses = {}, {}
    loads = []
    for r in range(job["repeats"]):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for mode in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            grads = gradient(setup, mode, solver, steps, wrt)
            times[mode].append(time.perf_counter() - start)
            cpu_times[mode].append(time.process_time() - cpu_start)
            step_times[mode].append(times[mode][-1] + optimiser_step(setup, bool(grads), wrt))
            if r == 0 and grads:
                ref = refs.get("edict" if mode == "reversible" else "sampler", {})
                errors[mode] = {g: compare(grads.get(g), ref.get(g)) for g in GROUPS if grads.get(g) is not None}
                losses[mode] = grads["loss"]
            del grads
        loads.append(loadavg()[0] if loadavg() else None)
    return {"times": times, "cpu_times": cpu_times, "step_times": step_times, "errors": errors, "losses": losses, "loadavg_1min": loads,
            "parameters": parameter_count(setup.model)}


def _fix_mmap_threshold(nbytes: int) -> bool:
    """glibc: allocations ≥ nbytes get their own pages, returned to the kernel on free (no heap reuse)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def job_memory(job: dict) -> dict:
    threshold = job.get("mmap_threshold")
    fixed = _fix_mmap_threshold(threshold) if threshold else False
    spec = ModelSpec.from_json(job["spec"])
    setup = build_setup(spec, torch.float32)
    _warm_up(setup, job["solver"])
    model_mib = sum(p.numel() * p.element_size() for p in setup.model.parameters()) / 2**20
    rss_before = rss_mib()
    with PeakRSS() as peak:
        start, cpu_start = time.perf_counter(), time.process_time()
        gradient(setup, job["mode"], job["solver"], job["steps"], job["wrt"])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out = {"peak_mib": peak.peak_mib, "method": peak.method, "rss_before_mib": rss_before, "model_mib": model_mib}
    if fixed:  # page-per-tensor allocation is slower: not a timing sample
        out["method"] += f", glibc mmap threshold fixed at {threshold} B"
    else:
        out.update(seconds=seconds, cpu_seconds=cpu_seconds)
    return out


JOBS = {"reference": job_reference, "timing": job_timing, "memory": job_memory}


# ---------------------------------------------------------------------------------------------------
# the orchestrator
# ---------------------------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    suite: str
    models: list[ModelSpec]
    solvers: list[str]
    steps: list[int]
    modes: list[str]
    wrt: list[str]
    repeats: int = 1
    mem_limit_gib: float = 10.0
    mmap_threshold: int | None = None
    memory_only: bool = False
    threads: int | None = None
    timeout_s: float = 3600.0
    notes: list[str] = field(default_factory=list)


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    started = time.time()
    result = {
        "suite": cfg.suite,
        "config": {
            "models": [m.to_json() for m in cfg.models], "solvers": cfg.solvers, "steps": cfg.steps,
            "modes": cfg.modes, "wrt": cfg.wrt, "repeats": cfg.repeats, "mem_limit_gib": cfg.mem_limit_gib,
            "mmap_threshold": cfg.mmap_threshold, "threads": cfg.threads, "memory_only": cfg.memory_only,
            "loss": "mean((x_0 - target)^2), fixed random target",
        },
        "machine": machine_info(),
        "notes": list(cfg.notes),
        "rows": [],
        "references": [],
    }
    with tempfile.TemporaryDirectory(prefix="adjointdpm-bench-") as tmp, Zygote(jobs=__name__) as zygote:
        for spec in cfg.models:
            for solver in cfg.solvers:
                _sweep_one(cfg, spec, solver, Path(tmp), result, log, zygote.run)
    result["machine"]["loadavg_at_end"] = loadavg()
    result["wall_s"] = time.time() - started
    from .report import ratios

    result["ratios"] = ratios(result)
    return result


def _sweep_one(cfg: SweepConfig, spec: ModelSpec, solver: str, tmp: Path, result: dict, log, run_worker) -> None:
    modes = [m for m in cfg.modes if supports(m, solver) is None]
    for m in cfg.modes:
        if supports(m, solver) is not None:
            result["rows"].append(_row(spec, solver, None, m, status=f"n/a: {supports(m, solver)}"))
    kinds = ["forward"] + (["forward_edict"] if "reversible" in modes else [])
    base = {"spec": spec.to_json(), "solver": solver, "wrt": cfg.wrt, "threads": cfg.threads}
    last_peak: dict[str, tuple[int, float]] = {}
    for n in sorted(cfg.steps):
        t0 = time.time()
        log(f"[{spec.name} {solver} N={n}] load {loadavg()[:1]}: " + ("memory …" if cfg.memory_only else "float64 reference …"))
        references = {}
        for family in ([] if cfg.memory_only else ["sampler"] + (["edict"] if "reversible" in modes else [])):
            path = str(tmp / f"{spec.name}-{solver}-{n}-{family}.pt")
            ref = run_worker({**base, "job": "reference", "steps": n, "family": family, "path": path,
                              "check_backprop": n == min(cfg.steps)}, cfg.timeout_s)
            result["references"].append({"model": spec.name, "solver": solver, "N": n, "family": family, **ref})
            references[family] = None if "error" in ref else path
            if "error" in ref:
                log(f"   reference {family} failed: {ref['error']}")
        # memory first: it also tells which methods fit at this N
        run_now, skipped = [], {}
        for mode in kinds + modes:
            if mode in last_peak:
                n_prev, peak_prev = last_peak[mode]
                projected = peak_prev * n / n_prev / 1024
                if projected > cfg.mem_limit_gib:
                    skipped[mode] = f"skipped: projected {projected:.1f} GiB > limit {cfg.mem_limit_gib} GiB"
                    continue
            run_now.append(mode)
        memory = {}
        for mode in run_now:
            mem = run_worker({**base, "job": "memory", "steps": n, "mode": mode, "mmap_threshold": cfg.mmap_threshold},
                             cfg.timeout_s)
            memory[mode] = mem
            if "error" not in mem:
                last_peak[mode] = (n, mem["peak_mib"])
        log(f"   memory done ({time.time() - t0:.0f} s); timing {len(run_now)} methods × {cfg.repeats} rounds …")
        timing = {"error": "not run (memory only)"} if cfg.memory_only else run_worker(
            {**base, "job": "timing", "steps": n, "modes": run_now, "repeats": cfg.repeats, "references": references},
            cfg.timeout_s)
        for mode in kinds + modes:
            if mode in skipped:
                result["rows"].append(_row(spec, solver, n, mode, status=skipped[mode]))
                continue
            row = _row(spec, solver, n, mode)
            mem = memory.get(mode, {"error": "not run"})
            if "error" in mem:
                row["status"] = f"memory job failed: {mem['error']}"
            else:
                row.update(peak_mib=mem["peak_mib"], memory_method=mem["method"], model_mib=mem["model_mib"])
            if cfg.memory_only:
                pass
            elif "error" in timing:
                row["status"] = f"timing job failed: {timing['error']}"
            else:
                # samples: the timing rounds, plus the memory process's measured call when it ran
                samples = list(timing["times"][mode]) + ([mem["seconds"]] if "seconds" in mem else [])
                cpu_samples = list(timing["cpu_times"][mode]) + ([mem["cpu_seconds"]] if "cpu_seconds" in mem else [])
                row["times_s"], row["cpu_times_s"] = samples, cpu_samples
                row["time_s"], row["cpu_s"] = min(samples), min(cpu_samples)
                optimiser = min(s - t for s, t in zip(timing["step_times"][mode], timing["times"][mode]))
                row["step_s"] = row["time_s"] + optimiser
                row["errors"] = timing["errors"].get(mode)
                row["loss"] = timing["losses"].get(mode)
                row["forward"] = forward_kind(mode) if not mode.startswith("forward") else None
                row["loadavg_1min"] = timing["loadavg_1min"]
                row["parameters"] = timing["parameters"]
            result["rows"].append(row)
        log(f"   N={n} done in {time.time() - t0:.0f} s")
        _log_rows(result, spec.name, solver, n, log)


def _row(spec, solver, n, mode, status="ok") -> dict:
    return {"model": spec.name, "solver": solver, "N": n, "mode": mode, "status": status}


def _log_rows(result, model, solver, n, log) -> None:
    for row in result["rows"]:
        if row["model"] == model and row["solver"] == solver and row["N"] == n:
            err = (row.get("errors") or {}).get("x_T") or {}
            log(f"   {row['mode']:>15}: {row.get('time_s', float('nan')):8.2f} s  "
                f"{row.get('peak_mib', float('nan')):9.1f} MiB  rel.err x_T {err.get('rel', float('nan')):.2e}  "
                f"{row['status'] if row['status'] != 'ok' else ''}")
