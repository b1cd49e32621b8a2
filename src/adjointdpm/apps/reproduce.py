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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from . import audit, guide, invert, stylize
from .checks import check_writable
from .loop import LoopConfig, run
from .options import EngineOptions, option
from .registry import APPLICATIONS
from .session import Session

BASELINES = ("exact", "backprop", "checkpoint", "truncated", "onestep")


@dataclass
class ReproduceOptions:
    """reproduce's command line."""

    out: Path = option(Path("outputs/reproduce"), "--out", "-o", help="Folder for every run's outputs.")
    docs: Path = option(Path("docs"), "--docs", help="Where results.md and img/results_*.png are written.")
    scale: str = option("full", "--scale", help="full (the documented results) | tiny (a smoke test).")
    only: Optional[str] = option(None, "--only", help="Comma-separated subset: guide,audit,stylize,invert.")
    jobs: Optional[int] = option(None, "--jobs", help="Worker processes running applications side by side (default: 2 for full).")
    threads: int = option(1, "--threads", help="torch threads per worker.")
    model: Optional[Path] = option(None, "--model", "-m", help="Another model folder with critics/ (default: the embedded model).")


@dataclass
class Scale:
    """A preset: the sampler, and each application's options (instances of its ``Options``; ``iters`` is the
    AdjointDPM run's, the baselines run until they reach its model calls)."""

    steps: int
    solver: str
    guide: guide.Options
    guide_digits: tuple
    audit: audit.Options
    safety: audit.Options
    stylize: stylize.Options
    invert: invert.Options
    baselines: tuple = BASELINES
    guide_extra: tuple = ()
    guide_seeds: tuple = ()  # the command's defaults (``adjointdpm guide --target-class D --seed S``) on these seeds
    baseline_digits: tuple = (8,)
    gradcheck_steps: tuple = (10, 15, 20)
    gradcheck_n: int = 4
    jobs: int = 2

    @property
    def guidance(self) -> dict:
        """Each application's guidance scale on the embedded model (absent: the model's default)."""
        return {name: app.embedded_guidance for name, app in APPLICATIONS.items() if app.embedded_guidance is not None}


SCALES = {
    # the commands' defaults are the documented recipes: "full" runs them as they are
    "full": Scale(
        steps=20, solver="dpmpp2m",
        guide=guide.Options(), guide_digits=(8, 9), baseline_digits=(8,),
        audit=audit.Options(),
        safety=audit.Options(attack="safety", n=48),
        stylize=stylize.Options(reference="outline"),
        invert=invert.Options(),
        guide_extra=("reversible",), guide_seeds=tuple(range(10)),
    ),
    "tiny": Scale(
        steps=6, solver="dpmpp2m",
        guide=guide.Options(n=2, lr=0.1, iters=2), guide_digits=(8,), baseline_digits=(8,),
        audit=audit.Options(n=8, eps=0.5, step_size=0.25, iters=2),
        safety=audit.Options(attack="safety", n=8, eps=0.5, step_size=0.25, iters=2),
        stylize=stylize.Options(reference="outline", lora_rank=2, lr=1e-3, content_weight=1.0, n_train=2, batch=2,
                                n_eval=2, iters=2),
        invert=invert.Options(effect="thicken", n_train=2, n_heldout=2, lr=0.05, iters=2),
        baselines=("truncated", "onestep"), gradcheck_steps=(2, 3), gradcheck_n=2, jobs=1, guide_seeds=(0, 1),
    ),
}


# ------------------------------------------------------------------------------------ running
class Runner:
    """Runs one application's rows: each an ordinary run of the registry's ``build`` with a preset's options."""

    def __init__(self, out: Path, scale: Scale, model, progress: bool, app: str, log=None):
        self.out, self.preset, self.model, self.progress, self.app = out, scale, model, progress, app
        self.log = log or (lambda msg: None)

    def session(self, grad: str, solver: str | None = None, steps: int | None = None) -> Session:
        return Session(EngineOptions(model=self.model, grad=grad, solver=solver or self.preset.solver,
                                     steps=steps or self.preset.steps,
                                     guidance_scale=self.preset.guidance.get(self.app)))

    def run(self, folder: str, grad: str, options, budget: int | None, seed: int = 0) -> dict:
        """One run of this application with ``options`` (``budget``: run until it, not ``options.iters``);
        ``seed``: the task's and the loop's, as the command's ``--seed``."""
        s = self.session(grad, solver="ddim" if grad == "reversible" else None)
        task = APPLICATIONS[self.app].build(s, options, seed=seed)
        cfg = LoopConfig(out=self.out / folder, iters=options.iters if budget is None else 10**6, budget=budget,
                         checkpoint_every=10**6, progress=self.progress, seed=seed,
                         overwrite=True)  # (reproduce remakes its runs: an earlier one in --out is replaced)
        summary = run(task, cfg)
        summary["folder"] = str(self.out / folder)
        summary["method"] = grad
        self.log(f"[{folder}] {summary['iterations']} iterations, {summary['model_calls']['total']} model calls, "
                 f"{summary['seconds']:.0f} s")
        return summary

    def compare(self, options, extra: tuple = (), tag: str = "", seed: int = 0) -> list[dict]:
        """AdjointDPM first, then every baseline at the model calls AdjointDPM used."""
        rows = [self.run(f"{self.app}/adjoint{tag}", "adjoint", options, None, seed)]
        budget = rows[0]["model_calls"]["total"]
        for grad in (*self.preset.baselines, *extra):
            rows.append(self.run(f"{self.app}/{grad}{tag}", grad, options, budget, seed))
        return rows


def run_guide(r: Runner) -> dict:
    res = {"digits": {}, "baselines": {}}
    for d in r.preset.guide_digits:
        options = replace(r.preset.guide, target_class=str(d))
        if d in r.preset.baseline_digits:
            rows = r.compare(options, r.preset.guide_extra, tag=f"_{d}")
            res["baselines"][d] = rows
            res["digits"][d] = rows[0]
        else:
            res["digits"][d] = r.run(f"guide/adjoint_{d}", "adjoint", options, None)
    # robustness across seeds: the command as a user runs it (its own gradient mode, every default)
    res["seeds"] = {d: [_seed_row(r.run(f"guide/seeds_{d}/seed_{s}", "exact", replace(r.preset.guide, target_class=str(d)),
                                        None, seed=s), s)
                        for s in r.preset.guide_seeds] for d in r.preset.guide_digits} if r.preset.guide_seeds else {}
    return res


def _seed_row(summary: dict, seed: int) -> dict:
    a = summary["after"]
    return {"seed": seed, "judge_accuracy": a.get("judge_accuracy"), "frechet_to_class": a.get("frechet_to_class"),
            "off_manifold": a.get("off_manifold_count"), "seconds": summary["seconds"],
            "iterations": summary["iterations"], "model_calls": summary["model_calls"]["total"]}


def run_audit(r: Runner) -> dict:
    rows = r.compare(r.preset.audit)
    safety = r.run("audit/safety_adjoint", "adjoint", r.preset.safety, None, seed=1)
    return {"baselines": rows, "safety": safety}


def run_stylize(r: Runner) -> dict:
    return {"baselines": r.compare(r.preset.stylize)}


def run_invert(r: Runner) -> dict:
    return {"baselines": r.compare(r.preset.invert)}


def run_gradcheck(r: Runner) -> dict:
    """Cosine of each mode's ∂L/∂x_T to the exact gradient (guide loss, digit 8), per step count."""
    from .baselines import grad_label
    from .call_count import CallCounter

    modes = ("exact", "backprop", "checkpoint", "adjoint", "adjoint-stored", "truncated", "onestep")
    options = guide.Options(target_class="8", n=r.preset.gradcheck_n, optimizer="adamw", lr=0.05, views=4,
                            view_noise=0.0)
    table = []
    for steps in r.preset.gradcheck_steps:
        grads, costs = {}, {}
        for grad in modes:
            s = r.session(grad, steps=steps)
            task = guide.build(s, options)
            task.setup()
            counter = CallCounter([s.network])
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
#: the applications reproduce measures: the registry's that have a runner here (and a section in the report)
APPS = tuple(name for name in APPLICATIONS if name in RUNNERS)
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
            "settings": {a: asdict(getattr(sc, a)) for a in ("guide", "audit", "safety", "stylize", "invert")}}
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
