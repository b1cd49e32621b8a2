"""``adjointdpm reproduce``: the four applications with their baselines on the embedded model, and
``docs/results.md`` written from what the runs measured.

For each application the AdjointDPM run (``grad="adjoint"``, backsolve) goes first; the number of model
calls it used (network forward + backward evaluations, counted by hooks) is the budget every baseline
then gets: the exact discrete adjoint, naive backprop, checkpointing, truncated backprop (K = 1), the
one-step x̂₀ baseline (and, for guided sampling on DDIM, the reversible EDICT sampler of DOODL). A
method whose iteration is cheaper runs more iterations. The reversible baseline samples with EDICT's coupled
DDIM chain (its own sampler, so its "before" images differ). Every run is an ordinary application run
(its own folder with before/, after/, summary.json, …), so any row can be re-run by its command.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import EngineOptions, Session
from .loop import LoopConfig, check_writable, run

APPS = ("guide", "audit", "stylize", "invert")
BASELINES = ("exact", "backprop", "checkpoint", "truncated", "onestep")



@dataclass
class Scale:
    steps: int
    solver: str
    guide: dict
    guide_digits: tuple
    audit: dict
    safety: dict
    stylize: dict
    invert: dict
    baselines: tuple = BASELINES
    guide_extra: tuple = ()
    baseline_digits: tuple = (8,)
    guidance: dict = field(default_factory=dict)  # per application; absent: the model's default
    gradcheck_steps: tuple = (10, 15, 20)
    gradcheck_n: int = 4
    jobs: int = 2


SCALES = {
    "full": Scale(
        steps=20, solver="dpmpp2m",
        guide=dict(n=16, lr=0.1, optimizer="normalized", views=8, view_noise=0.3, stop_loss=0.1, iters=20),
        guide_digits=(8, 9), baseline_digits=(8,),
        audit=dict(n=100, eps=0.2, step_size=0.05, iters=6),
        safety=dict(n=48, eps=0.2, step_size=0.05, iters=6),
        stylize=dict(reference="outline", lora_rank=4, lr=3e-3, content_weight=1.0, n_train=16, batch=8, n_eval=32, iters=10),
        invert=dict(effect="thicken", n_train=8, n_heldout=8, lr=0.1, iters=10),
        guidance={"audit": 1.0, "stylize": 1.0, "invert": 1.0}, guide_extra=("reversible",),
    ),
    "tiny": Scale(
        steps=6, solver="dpmpp2m",
        guide=dict(n=2, lr=0.1, iters=2), guide_digits=(8,), baseline_digits=(8,),
        audit=dict(n=8, eps=0.5, step_size=0.25, iters=2),
        safety=dict(n=8, eps=0.5, step_size=0.25, iters=2),
        stylize=dict(reference="outline", lora_rank=2, lr=1e-3, content_weight=1.0, n_train=2, batch=2, n_eval=2, iters=2),
        invert=dict(effect="thicken", n_train=2, n_heldout=2, lr=0.05, iters=2),
        baselines=("truncated", "onestep"), guidance={"audit": 1.0, "stylize": 1.0, "invert": 1.0},
        gradcheck_steps=(2, 3), gradcheck_n=2, jobs=1,
    ),
}


# ------------------------------------------------------------------------------------ running
class Runner:
    def __init__(self, out: Path, scale: Scale, model, progress: bool, app: str, log=None):
        self.out, self.preset, self.model, self.progress, self.app = out, scale, model, progress, app
        self.log = log or (lambda msg: None)

    def session(self, grad: str, solver: str | None = None, steps: int | None = None) -> Session:
        return Session(self.model, EngineOptions(grad=grad, solver=solver or self.preset.solver, steps=steps or self.preset.steps,
                                                 guidance_scale=self.preset.guidance.get(self.app)))

    def run(self, folder: str, grad: str, make_task, iters: int, budget: int | None, seed: int = 0) -> dict:
        s = self.session(grad, solver="ddim" if grad == "reversible" else None)
        task = make_task(s)
        cfg = LoopConfig(out=self.out / folder, iters=iters, budget=budget, checkpoint_every=10**6,
                         progress=self.progress, seed=seed)
        summary = run(task, cfg)
        summary["folder"] = str(self.out / folder)
        summary["method"] = grad
        self.log(f"[{folder}] {summary['iterations']} iterations, {summary['model_calls']['total']} model calls, "
                 f"{summary['seconds']:.0f} s")
        return summary

    def compare(self, app: str, make_task, iters: int, extra: tuple = (), tag: str = "") -> list[dict]:
        """AdjointDPM first, then every baseline at the model calls AdjointDPM used."""
        rows = [self.run(f"{app}/adjoint{tag}", "adjoint", make_task, iters, None)]
        budget = rows[0]["model_calls"]["total"]
        for grad in (*self.preset.baselines, *extra):
            rows.append(self.run(f"{app}/{grad}{tag}", grad, make_task, 10**6, budget))
        return rows


def digit_guide_task(s: Session, digit: int, seed: int = 0, **options):
    """A guide run toward one digit on the digits model (its guide classifier, judged by its judge)."""
    from .choose import guide_objective
    from .guide import GuideOptions, GuideTask

    target, judge, prompt = guide_objective(s, loss=None, classifier=None, clip=None, clip_prompt=None,
                                            target_class=digit, judge=None, prompt=None)
    return GuideTask(s, GuideOptions(prompt=prompt, **options), target, judge, seed=seed)


def run_guide(r: Runner) -> dict:
    o = dict(r.preset.guide)
    iters = o.pop("iters")
    res = {"digits": {}, "baselines": {}}
    for d in r.preset.guide_digits:
        make = lambda s, d=d: digit_guide_task(s, d, **o)  # noqa: E731
        if d in r.preset.baseline_digits:
            rows = r.compare("guide", make, iters, r.preset.guide_extra, tag=f"_{d}")
            res["baselines"][d] = rows
            res["digits"][d] = rows[0]
        else:
            res["digits"][d] = r.run(f"guide/adjoint_{d}", "adjoint", make, iters, None)
    return res


def digit_audit_task(s: Session, attack: str, seed: int, **options):
    from .audit import AuditOptions, AuditTask
    from .choose import audit_attack

    opts = AuditOptions(**options)
    return AuditTask(s, opts, audit_attack(s, attack=attack, classifier=None, margin=opts.margin, judge=None), seed=seed)


def run_audit(r: Runner) -> dict:
    o = dict(r.preset.audit)
    iters = o.pop("iters")
    rows = r.compare("audit", lambda s: digit_audit_task(s, "classifier", 0, **o), iters)
    so = dict(r.preset.safety)
    s_iters = so.pop("iters")
    safety = r.run("audit/safety_adjoint", "adjoint", lambda s: digit_audit_task(s, "safety", 1, **so), s_iters, None)
    return {"baselines": rows, "safety": safety}


def digit_stylize_task(s: Session, **options):
    from .choose import stylize_objective
    from .stylize import StylizeOptions, StylizeTask

    objective, judge, prompts, named, ref = stylize_objective(
        s, loss=None, backbone=None, content_weight=options.get("content_weight", 1.0), judge=None, prompt=None,
        reference=options.pop("reference", None))
    return StylizeTask(s, StylizeOptions(reference=ref, **options), objective, judge, seed=0, prompts=prompts,
                       references=named)


def run_stylize(r: Runner) -> dict:
    o = dict(r.preset.stylize)
    iters = o.pop("iters")
    return {"baselines": r.compare("stylize", lambda s: digit_stylize_task(s, **dict(o)), iters)}


def run_invert(r: Runner) -> dict:
    from .invert import InvertOptions, InvertTask

    o = dict(r.preset.invert)
    iters = o.pop("iters")
    return {"baselines": r.compare("invert", lambda s: InvertTask(s, InvertOptions(**o), seed=0), iters)}


def run_gradcheck(r: Runner) -> dict:
    """Cosine of each mode's ∂L/∂x_T to the exact gradient (guide loss, digit 8), per step count."""
    from .common import grad_label
    from .loop import CallCounter

    modes = ("exact", "backprop", "checkpoint", "adjoint", "adjoint-stored", "truncated", "onestep")
    table = []
    for steps in r.preset.gradcheck_steps:
        grads, costs = {}, {}
        for grad in modes:
            s = r.session(grad, steps=steps)
            task = digit_guide_task(s, 8, n=r.preset.gradcheck_n, optimizer="adamw", lr=0.05, views=4, view_noise=0.0)
            task.setup()
            counter = CallCounter([s.unet])
            t0 = time.perf_counter()
            loss, _ = task.compute_loss(0, torch.Generator())
            if loss.requires_grad:
                loss.backward()
            costs[grad] = (counter.total, time.perf_counter() - t0, grad_label(s.grad))
            counter.remove()
            grads[grad] = task.x.grad.detach().flatten(1)
        for grad in modes:
            cos = torch.nn.functional.cosine_similarity(grads[grad], grads["exact"], dim=1)
            table.append({"steps": steps, "method": grad, "label": costs[grad][2], "cos_mean": float(cos.mean()),
                          "cos_min": float(cos.min()), "calls": costs[grad][0], "seconds": round(costs[grad][1], 2)})
    r.log(f"[gradcheck] {len(table)} gradients")
    return {"rows": table, "n": r.preset.gradcheck_n, "guidance_scale": r.session("exact").guidance_scale}


RUNNERS = {"guide": run_guide, "audit": run_audit, "stylize": run_stylize, "invert": run_invert,
           "gradcheck": run_gradcheck}
ORDER = ("audit", "guide", "stylize", "invert", "gradcheck")  # longest first, for two workers


def _log(msg: str) -> None:
    print(msg, flush=True)


def _run_app(app: str, out: str, scale: str, model, progress: bool, threads: int | None) -> tuple[str, dict, float]:
    """One application in its own process (a worker of the pool)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    r = Runner(Path(out), SCALES[scale], model, progress, app, log=_log)
    res = RUNNERS[app](r)
    return app, _slim(res), time.perf_counter() - t0


def reproduce(out: Path, docs: Path, scale: str = "full", only: list[str] | None = None, progress: bool = True,
              model=None, jobs: int | None = None, threads: int | None = 1) -> dict:
    """Run the applications (and the gradient check), write ``out/results.json`` and ``docs/results.md``.

    ``jobs`` worker processes run whole applications side by side (default: the scale's, 2), each with
    ``threads`` torch threads (1: two single-threaded workers use two cores without oversubscription).
    """
    from .errors import UserInputError

    if scale not in SCALES:
        raise UserInputError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    apps = list(APPS) if only is None else list(only)
    unknown = [a for a in apps if a not in APPS]
    if unknown:
        raise UserInputError(f"--only: unknown application(s) {', '.join(unknown)}; use {', '.join(APPS)}")
    sc = SCALES[scale]
    jobs = sc.jobs if jobs is None else jobs
    if jobs < 1:
        raise UserInputError(f"--jobs must be >= 1, got {jobs}")
    out, docs = check_writable(Path(out)), Path(docs)
    check_writable(docs / "img")
    todo = [a for a in ORDER if a in apps or (a == "gradcheck" and only is None)]
    t0 = time.perf_counter()
    results, times = {}, {}
    if jobs == 1:
        if threads:
            torch.set_num_threads(threads)
        for app in todo:
            _, res, sec = _run_app(app, str(out), scale, model, progress, None)
            results[app], times[app] = res, round(sec, 1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_app, app, str(out), scale, model, False, threads) for app in todo]
            for f in futures:
                app, res, sec = f.result()
                results[app], times[app] = res, round(sec, 1)
    wall = time.perf_counter() - t0
    meta = {"scale": scale, "seconds": round(wall, 1), "seconds_per_application": times, "apps": apps,
            "jobs": jobs, "threads": threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "commit": _git_commit(),
            "steps": sc.steps, "solver": sc.solver, "guidance": sc.guidance,
            "settings": {a: getattr(sc, a) for a in ("guide", "audit", "safety", "stylize", "invert")}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
    from .report import write_report

    write_report(results, meta, out, docs)
    return {"seconds": wall, "meta": meta, "results": results}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _slim(obj):
    """Drop the per-iteration histories' bulk but keep what the report needs (loss vs calls)."""
    if isinstance(obj, dict):
        if "loss" in obj and isinstance(obj["loss"], dict) and "history" in obj["loss"]:
            obj = dict(obj)
            hist = obj["loss"]["history"]
            obj["curve"] = [{"calls": h["calls"], "loss": h["loss"],
                             **({"success_rate": h["success_rate"]} if "success_rate" in h else {})} for h in hist]
            obj["loss"] = {k: v for k, v in obj["loss"].items() if k != "history"}
        return {str(k): _slim(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_slim(v) for v in obj]
    return obj
