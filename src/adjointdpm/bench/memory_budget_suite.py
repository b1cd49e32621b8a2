"""The memory-budget benchmark (``python -m adjointdpm.bench budget``): what ``Exact(memory=B)`` buys.

For each model, one gradient of L = mean((x_0 − target)²) with respect to x_T and the text embeddings (or
``--wrt``), at N steps, for

    forward (sampling only), backprop, and Exact(memory=B) for B = 0, 25, 50, 100 % of backprop's peak
    and B = inf (every step's graph kept).

Memory: peak RSS of one gradient in a fresh process (see ``common.PeakRSS`` and ``zygote.py``); backprop's
peak is measured first and sets the budgets. Time: one process, plain sampling and every method in
rotating order for ``--repeats`` rounds, the fastest round reported (wall and process CPU time). Each
gradient is compared with backprop's from the same round (relative error), and the network calls made by
the backward pass are counted (0 when every step's graph was kept; N·calls when none was). Ratios:
time(Exact(memory=inf))/time(backprop) (target ≤ 1.05) and, per budget, time and peak against backprop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import ModelSpec, PeakRSS, build_setup, compare, loadavg, machine_info
from .zygote import Zygote

INF_TARGET = 1.05
FRACTIONS = (0.0, 0.25, 0.5, 1.0)


def _grad_mode(method: dict):
    import adjointdpm as adpm

    if method["kind"] in ("backprop", "forward"):
        return method["kind"]
    memory = method["memory"]
    return adpm.Exact(memory=math.inf if memory == "inf" else memory)


def gradient(setup, method: dict, solver: str, steps: int, wrt) -> dict:
    """One gradient (or plain sampling for "forward"); the gradients by group and the backward's network calls."""
    import adjointdpm as adpm

    from .sweep import _leaves, grouped_gradients

    common = dict(schedule=setup.schedule, steps=steps, guidance_scale=setup.guidance_scale, solver=solver,
                  prediction_type=setup.prediction_type)
    if method["kind"] == "forward":
        with torch.no_grad():
            adpm.sample(setup.model, setup.x_T, cond=setup.cond, uncond=setup.uncond, grad=None, **common)
        return {}
    calls = [0]
    handle = setup.model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        x_T, cond, uncond = _leaves(setup, wrt)
        x0 = adpm.sample(setup.model, x_T, cond=cond, uncond=uncond, grad=_grad_mode(method), **common)
        before = calls[0]
        loss = (x0 - setup.target).square().mean()
        loss.backward()
    finally:
        handle.remove()
    out = {**grouped_gradients(setup, x_T, cond, uncond, wrt), "backward_calls": calls[0] - before}
    return {g: v for g, v in out.items() if v is not None}


def _setup(job):
    from .sweep import _warm_up

    torch.manual_seed(0)
    setup = build_setup(ModelSpec.from_json(job["spec"]), torch.float32)
    _warm_up(setup, job["solver"])
    return setup


def job_memory(job: dict) -> dict:
    setup = _setup(job)
    with PeakRSS() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        grads = gradient(setup, job["method"], job["solver"], job["steps"], job["wrt"])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"peak_mib": peak.peak_mib, "memory_method": peak.method, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "backward_calls": grads.get("backward_calls")}


def job_timing(job: dict) -> dict:
    setup = _setup(job)
    methods = job["methods"]
    times = {m["label"]: [] for m in methods}
    cpu_times = {m["label"]: [] for m in methods}
    errors, calls, loads = {}, {}, []
    for r in range(job["repeats"]):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        reference = None
        for method in order:
            start, cpu = time.perf_counter(), time.process_time()
            grads = gradient(setup, method, job["solver"], job["steps"], job["wrt"])
            times[method["label"]].append(time.perf_counter() - start)
            cpu_times[method["label"]].append(time.process_time() - cpu)
            if r == 0 and grads:
                calls[method["label"]] = grads.pop("backward_calls")
                if method["kind"] == "backprop":
                    reference = grads
                errors[method["label"]] = grads
        loads.append(loadavg()[0] if loadavg() else None)
        if r == 0:  # every gradient of the first round against backprop's
            errors = {label: {g: compare(v, reference.get(g)) for g, v in grads.items()} for label, grads in errors.items()}
    return {"times": times, "cpu_times": cpu_times, "errors": errors, "backward_calls": calls, "loadavg_1min": loads}


JOBS = {"memory": job_memory, "timing": job_timing}


# ---------------------------------------------------------------------------------------------------
# the orchestrator
# ---------------------------------------------------------------------------------------------------


@dataclass
class BudgetConfig:
    models: list[ModelSpec]
    steps: int = 25
    solver: str = "ddim"
    wrt: list[str] = field(default_factory=lambda: ["x_T", "text"])
    fractions: tuple[float, ...] = FRACTIONS
    repeats: int = 2
    threads: int | None = None
    timeout_s: float = 1800.0
    notes: list[str] = field(default_factory=list)


def _label(fraction: float) -> str:
    return f"exact, {fraction:.0%} of backprop's peak"


def run_budget(cfg: BudgetConfig, log=print) -> dict:
    started = time.time()
    result = {"suite": "budget", "machine": machine_info(), "notes": list(cfg.notes), "rows": [],
              "config": {"models": [m.to_json() for m in cfg.models], "steps": cfg.steps, "solver": cfg.solver,
                         "wrt": cfg.wrt, "fractions": list(cfg.fractions), "repeats": cfg.repeats,
                         "threads": cfg.threads, "loss": "mean((x_0 - target)^2), fixed random target"}}
    with Zygote(jobs=__name__) as zygote:
        for spec in cfg.models:
            _one_model(cfg, spec, zygote.run, result, log)
    result["machine"]["loadavg_at_end"] = loadavg()
    result["wall_s"] = time.time() - started
    result["ratios"] = ratios(result)
    return result


def _one_model(cfg, spec, run, result, log) -> None:
    base = {"spec": spec.to_json(), "solver": cfg.solver, "steps": cfg.steps, "wrt": cfg.wrt, "threads": cfg.threads}
    log(f"[{spec.name} {cfg.solver} N={cfg.steps}] load {loadavg()[:1]}: memory of forward and backprop …")
    methods = [{"label": "forward", "kind": "forward"}, {"label": "backprop", "kind": "backprop"}]
    memory = {m["label"]: run({**base, "job": "memory", "method": m}, cfg.timeout_s) for m in methods}
    backprop_peak = memory["backprop"].get("peak_mib")
    if backprop_peak is None:
        log(f"   backprop failed: {memory['backprop'].get('error')}")
        return
    for fraction in cfg.fractions:
        budget = fraction * backprop_peak * 2**20
        methods.append({"label": _label(fraction), "kind": "exact", "fraction": fraction, "memory": budget})
    methods.append({"label": "exact, memory=inf", "kind": "exact", "fraction": None, "memory": "inf"})
    for m in methods[2:]:
        log(f"   memory: {m['label']} …")
        memory[m["label"]] = run({**base, "job": "memory", "method": m}, cfg.timeout_s)
    log(f"   timing {len(methods)} methods × {cfg.repeats} rounds …")
    timing = run({**base, "job": "timing", "methods": methods, "repeats": cfg.repeats}, cfg.timeout_s)
    for m in methods:
        row = {"model": spec.name, "solver": cfg.solver, "N": cfg.steps, "method": m["label"], "kind": m["kind"],
               "fraction": m.get("fraction"), "budget_mib": None, "status": "ok"}
        if m["kind"] == "exact":
            row["budget_mib"] = "inf" if m["memory"] == "inf" else m["memory"] / 2**20
        mem = memory[m["label"]]
        if "error" in mem:
            row["status"] = f"memory job failed: {mem['error']}"
        else:
            row.update(peak_mib=mem["peak_mib"], memory_method=mem["memory_method"])
        if "error" in timing:
            row["status"] = f"timing job failed: {timing['error']}"
        else:
            samples = timing["times"][m["label"]] + ([mem["seconds"]] if "seconds" in mem else [])
            cpu_samples = timing["cpu_times"][m["label"]] + ([mem["cpu_seconds"]] if "cpu_seconds" in mem else [])
            row.update(times_s=samples, cpu_times_s=cpu_samples, time_s=min(samples), cpu_s=min(cpu_samples),
                       errors_vs_backprop=timing["errors"].get(m["label"]),
                       backward_calls=timing["backward_calls"].get(m["label"]), loadavg_1min=timing["loadavg_1min"])
        result["rows"].append(row)
        log(f"   {m['label']:>36}: {row.get('time_s', float('nan')):7.2f} s  {row.get('peak_mib', float('nan')):8.1f} MiB"
            f"  backward calls {row.get('backward_calls')}")


def ratios(result: dict) -> dict:
    out = {"inf_target": INF_TARGET, "per_model": []}
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = {r["method"]: r for r in result["rows"] if r["model"] == model}
        bp = rows.get("backprop", {})
        entry = {"model": model, "curve": []}
        for key, suffix in (("time_s", ""), ("cpu_s", "_cpu")):
            inf = rows.get("exact, memory=inf", {})
            entry["inf_over_backprop" + suffix] = _div(inf.get(key), bp.get(key))
        for label, r in rows.items():
            if r["kind"] == "exact":
                entry["curve"].append({"method": label, "fraction": r["fraction"],
                                       "time_over_backprop": _div(r.get("time_s"), bp.get("time_s")),
                                       "cpu_over_backprop": _div(r.get("cpu_s"), bp.get("cpu_s")),
                                       "peak_over_backprop": _div(r.get("peak_mib"), bp.get("peak_mib"))})
        out["per_model"].append(entry)
    return out


def _div(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def budget_table(result: dict) -> str:
    """Markdown: one row per (model, method)."""
    head = ("model | method | budget MiB | peak MiB | s/grad | CPU s | ×backprop (wall) | ×backprop (CPU) | "
            "backward network calls | rel.err vs backprop (worst group)")
    lines = ["| " + head + " |", "|" + "---|" * (head.count("|") + 1)]
    for r in result["rows"]:
        bp = next(b for b in result["rows"] if b["model"] == r["model"] and b["method"] == "backprop")
        budget = r["budget_mib"] if r["budget_mib"] in (None, "inf") else f"{r['budget_mib']:.0f}"
        err = [e["rel"] for e in (r.get("errors_vs_backprop") or {}).values() if e]
        lines.append(f"| {r['model']} | {r['method']} | {budget if budget is not None else ''} | "
                     f"{_fmt(r.get('peak_mib'), '.0f')} | {_fmt(r.get('time_s'), '.2f')} | {_fmt(r.get('cpu_s'), '.2f')} | "
                     f"{_fmt(_div(r.get('time_s'), bp.get('time_s')), '.3f')} | "
                     f"{_fmt(_div(r.get('cpu_s'), bp.get('cpu_s')), '.3f')} | "
                     f"{'' if r['kind'] == 'forward' else _fmt(r.get('backward_calls'), 'd')} | "
                     f"{_fmt(max(err) if err else None, '.1e')} |")
    for e in result["ratios"]["per_model"]:
        v, c = e["inf_over_backprop"], e["inf_over_backprop_cpu"]
        verdict = "not measured" if v is None else ("met" if v <= INF_TARGET else "MISSED")
        lines.append("")
        lines.append(f"{e['model']}: time(Exact(memory=inf))/time(backprop) = {_fmt(v, '.3f')} wall, {_fmt(c, '.3f')} CPU "
                     f"(target ≤ {INF_TARGET}: {verdict})")
    return "\n".join(lines)


def plot_budget(result: dict, path: str | Path) -> Path:
    """Time against peak memory, one panel per model: backprop, forward and the budget curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 4.3), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in result["rows"] if r["model"] == model and "time_s" in r and "peak_mib" in r]
        curve = [r for r in rows if r["kind"] == "exact"]
        ax.plot([r["peak_mib"] for r in curve], [r["time_s"] for r in curve], "-o", label="Exact(memory=budget)")
        for r in curve:
            tag = "inf" if r["fraction"] is None else f"{r['fraction']:.0%}"
            ax.annotate(tag, (r["peak_mib"], r["time_s"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for r in rows:
            if r["kind"] in ("backprop", "forward"):
                ax.plot([r["peak_mib"]], [r["time_s"]], "s" if r["kind"] == "backprop" else "^", label=r["kind"])
        ax.set_xlabel("peak RSS above baseline (MiB), fresh process")
        ax.set_ylabel("seconds per gradient")
        ax.set_title(f"{model}, {result['config']['solver']}, N = {result['config']['steps']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
