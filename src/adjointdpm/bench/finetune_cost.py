"""What one iteration of each fine-tuning method costs, against one plain sample of the same batch, in one run.

    python -m adjointdpm.bench.finetune_cost [--models embedded,sd15-reduced] [--methods …] [--repeats 3]
        [--threads 1] [--out FILE.json] [--markdown FILE.md] [--in-process]

An iteration is what ``adjointdpm finetune`` does per batch: ``method.backward(rollout, reward, generator)``
(:mod:`adjointdpm.finetuning`), the global gradient norm clipped to 1, one AdamW step on the LoRA (rank 4,
``adjointdpm.apps.weights.LORA_TARGETS``). The plain sample is ``adjointdpm.sample`` of the same rollout with
no graph, decoded and scored by the same reward, under ``torch.no_grad``. For each method (``exact``,
``truncated:k=1``, ``truncated:k=2``, ``alignprop``, ``onestep``, ``adjoint``, ``adjoint-matching``):

* model calls: forward and VJP network evaluations, counted by hooks (:class:`~adjointdpm.finetuning.CallCounter`,
  the counts the methods report: a guided call on [uncond; cond] counts once); the mean over the timed
  iterations (AlignProp's truncation and ReFL's step are drawn per iteration);
* seconds: the median of ``--repeats`` iterations after one warm-up iteration of every method, the methods
  interleaved in a rotating order (wall clock; process CPU time beside it);
* peak memory: on CPU the peak resident set size of one iteration above the RSS just before it, in a fresh
  process per method (``common.PeakRSS``: the kernel's high-water mark after ``clear_refs``, forked by
  ``zygote.Zygote``, after one warm-up iteration of that method so that one-time allocations — the LoRA's
  gradients and AdamW state, thread pools — are in the baseline); ``--in-process`` measures it in the timing
  process instead (faster, less clean). On CUDA ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``: the peak above the memory allocated before the iteration (the ratio's
  numerator), and the total with the weights.

Each is also given as a ratio to the plain sample measured in the same run.

Models: ``embedded`` — the embedded digits model through the finetune application's own pieces (its
session: DPM-Solver++(2M), 20 steps, guidance 4; the reward ``digits-guide``, the guide classifier's
log-probability of the prompt's digit; the first ``--batch`` of the ten digit prompts); ``sd15-reduced`` —
the SD-1.5-shaped reduced UNet and VAE of ``family_configs.REDUCED`` (random weights, 64² images, 8² × 4
latents, text 4 × 32, CFG 7.5, the same sampler) with the reward ``family_reward``: a fixed random linear
functional of the decoded image. The GPU suite's ``finetune`` target (``python -m adjointdpm.bench gpu
--targets finetune``) runs the same measurement on the families at native size (:func:`family_case`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import peft  # noqa: F401
import torch

# (imported here, not in the functions that use them: the fresh processes are forked from a helper that has
# imported this module, so each one starts with them loaded)
from ..apps import finetune as _finetune_app  # noqa: F401
from ..apps import session as _session  # noqa: F401
from ..embedded import rewards as _digit_rewards  # noqa: F401
from ..rewards import load_rewards as _load_rewards  # noqa: F401
from ..finetuning import CallCounter, Rollout, parse_method
from .family_configs import FAMILIES, build_network, build_vae
from .gpu import GUIDANCE, Inputs, sample_kwargs

METHOD_SPECS = ("exact", "truncated:k=1", "truncated:k=2", "alignprop", "alignprop:kl=3", "onestep", "adjoint",
                "adjoint-matching")
SAMPLE = "sample"
MODELS = ("embedded", "sd15-reduced")
LORA_RANK = 4
RATIO_KEYS = ("model_calls", "seconds", "cpu_seconds", "peak_mib")
LEARNING_RATE = 1e-5  # (the cost of an iteration does not depend on it; small keeps random-weight models sane)


# -- what is measured ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One model's fine-tuning iteration: the network (LoRA added), the rollout of one batch, the reward."""

    name: str
    network: torch.nn.Module
    rollout: object  # adjointdpm.finetuning.Rollout
    reward: Callable[[torch.Tensor], torch.Tensor]
    params: list
    settings: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)  # keyword defaults of parse_method (Adjoint Matching's λ)


def add_lora(network: torch.nn.Module, rank: int = LORA_RANK, seed: int = 0) -> list:
    """peft LoRA adapters on the projections and convolutions ``adjointdpm finetune`` trains; the adapters."""
    from peft import LoraConfig

    from ..apps.weights import LORA_TARGETS

    torch.manual_seed(seed)
    network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    params = []
    for name, p in network.named_parameters():
        p.requires_grad_("lora_" in name)
        if p.requires_grad:
            params.append(p)
    return params


def embedded_case(batch: int = 8, steps: int | None = None) -> Case:
    """The embedded digits model as ``adjointdpm finetune`` samples and rewards it (its session, LoRA, reward)."""
    from ..apps.finetune import METHOD_RECIPES, Options, build
    from ..apps.options import EngineOptions
    from ..apps.session import Session
    from ..prompts import texts_and_fields

    session = Session(EngineOptions(steps=steps))
    task = build(session, Options(method="exact", batch=batch, lora_rank=LORA_RANK, eval_seeds=1))
    task.setup()  # (adds the LoRA as finetune does)
    prompts = [task.train_prompts[i % len(task.train_prompts)] for i in range(batch)]
    texts, fields = texts_and_fields(prompts)
    cond = session.encode(texts)
    x_T = session.noise(batch, 0)
    params = [p for p in session.network.parameters() if p.requires_grad]
    settings = {"model": "the embedded digits model", "solver": session.solver, "steps": session.steps,
                "guidance_scale": session.guidance_scale, "batch": batch, "lora_rank": LORA_RANK,
                "reward": "digits-guide: the guide classifier's log-probability of the prompt's digit",
                "prompts": texts, "trainable_parameters": sum(p.numel() for p in params)}
    return Case("embedded", session.network, task.rollout(x_T, cond), task.reward_of(texts, fields, {}), params,
                settings, {"reward_scale": METHOD_RECIPES["adjoint-matching"]["reward_scale"]})


def family_reward(vae, inputs, image_shape, device, seed: int = 3):
    """r(x_0) = ⟨w, decode(x_0)⟩ / √(numel): a fixed random linear functional of the decoded image (w seeded
    standard normal), differentiable through ``adjointdpm.vae.decode`` (checkpointed)."""
    from ..vae import decode

    w = torch.randn(*image_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    scale = 1.0 / math.sqrt(w.numel())

    def reward(x0: torch.Tensor) -> torch.Tensor:
        image = decode(vae, inputs.latents_for_vae(x0), checkpoint=True).float()
        return (image * w).flatten(1).sum(1) * scale
    return reward


def family_case(family_name: str = "sd15", reduced: bool = True, device="cpu", dtype=torch.float32, batch: int = 8,
                solver: str = "dpmpp2m", steps: int = 20) -> Case:
    """A model family of the GPU suite (``family_configs``: native size, or ``reduced``), random weights, LoRA
    rank 4, ``batch`` seeded noises with the suite's text embeddings (one prompt for the batch) and guidance."""
    device = torch.device(device)
    family = FAMILIES[family_name]
    network = build_network(family, reduced, device, dtype)
    params = add_lora(network)
    vae = build_vae(family, reduced, device, dtype)
    inputs = Inputs(family, reduced, device, dtype, vae.config.latent_channels)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(batch, *inputs.x_T.shape[1:], generator=g).to(device, dtype)
    cond, uncond = inputs.conditioning(text_grad=False)
    kwargs = sample_kwargs(family, inputs, solver, steps, cond, uncond)
    rollout = Rollout(network, x_T, schedule=kwargs["schedule"], timesteps=kwargs["timesteps"], cond=cond,
                      uncond=kwargs["uncond"], guidance_scale=kwargs["guidance_scale"], solver=solver)
    reward = family_reward(vae, inputs, (3, inputs.size, inputs.size), device)
    settings = {"model": f"{family_name} {'reduced' if reduced else 'native-size'} config, random weights",
                "solver": solver, "steps": steps, "guidance_scale": GUIDANCE[family_name], "batch": batch,
                "image_size": inputs.size, "latent_shape": list(x_T.shape[1:]), "dtype": str(dtype),
                "lora_rank": LORA_RANK, "trainable_parameters": sum(p.numel() for p in params),
                "reward": "a fixed random linear functional of the decoded image, <w, decode(x_0)>/sqrt(numel(w))"}
    return Case(f"{family_name}-reduced" if reduced else family_name, network, rollout, reward, params, settings)


class Runner:
    """Runs one iteration of a method (or the plain sample) of a case; a method's state and generator persist."""

    def __init__(self, case: Case):
        self.case = case
        self.device = case.rollout.x_T.device
        self.methods, self.generators = {}, {}
        self.optimizer = torch.optim.AdamW(case.params, lr=LEARNING_RATE, weight_decay=0.0)

    def method(self, spec: str):
        if spec not in self.methods:
            method = parse_method(spec, **self.case.method_options)
            method.check_sampler(self.case.rollout.solver, self.case.rollout.eta)
            method.prepare(self.case.network)
            self.methods[spec] = method
            self.generators[spec] = torch.Generator().manual_seed(0)
        return self.methods[spec]

    def once(self, spec: str) -> dict:
        """One iteration: {"forward", "vjp", "stats"}."""
        import adjointdpm as adpm

        case = self.case
        if spec == SAMPLE:
            with torch.no_grad(), CallCounter([case.network]) as calls:
                x0 = adpm.sample(case.network, case.rollout.x_T, grad=None, **case.rollout.sample_kwargs())
                r = case.reward(x0)
            return {"forward": calls.forward, "vjp": calls.vjp, "stats": {}, "finite": bool(torch.isfinite(r).all())}
        method = self.method(spec)
        self.optimizer.zero_grad(set_to_none=True)
        report = method.backward(case.rollout, case.reward, self.generators[spec])
        torch.nn.utils.clip_grad_norm_(case.params, 1.0)
        self.optimizer.step()
        stats = {k: v for k, v in report.stats.items() if isinstance(v, (int, float, list))}
        return {"forward": report.forward_calls, "vjp": report.vjp_calls, "stats": stats,
                "finite": bool(math.isfinite(report.loss))}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class CudaPeak:
    """``torch.cuda.max_memory_allocated`` over the block: ``peak_mib`` above the allocation before it,
    ``total_mib`` with it (weights, LoRA, optimiser state)."""

    method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, above the memory allocated before"

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline_mib = torch.cuda.memory_allocated() / 2**20
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.total_mib = torch.cuda.max_memory_allocated() / 2**20
        self.peak_mib = self.total_mib - self.baseline_mib


def peak_meter(device: torch.device):
    if device.type == "cuda":
        return CudaPeak()
    from .common import PeakRSS

    return PeakRSS()


def memory_of(runner: Runner, spec: str) -> dict:
    """Peak memory of one iteration of ``spec`` (after a warm-up iteration of it)."""
    runner.once(spec)
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    with peak_meter(runner.device) as peak:
        out = runner.once(spec)
        runner.sync()
    row = {"peak_mib": peak.peak_mib, "memory_method": peak.method, "baseline_mib": peak.baseline_mib,
           "memory_iteration": out}
    if hasattr(peak, "total_mib"):
        row["peak_total_mib"] = peak.total_mib
    return row


def timings_of(runner: Runner, specs: list[str], repeats: int, warm_up: bool = True) -> dict:
    """Every spec once (the warm-up, unless they already ran), then ``repeats`` rounds in a rotating order: per
    spec its iterations' seconds, CPU seconds and counts."""
    from .common import loadavg

    for spec in specs if warm_up else ():
        runner.once(spec)
        runner.sync()
    out = {s: {"seconds": [], "cpu_seconds": [], "iterations": []} for s in specs}
    loads = []
    for r in range(repeats):
        for spec in specs[r % len(specs):] + specs[:r % len(specs)]:
            runner.sync()
            start, cpu = time.perf_counter(), time.process_time()
            it = runner.once(spec)
            runner.sync()
            out[spec]["seconds"].append(time.perf_counter() - start)
            out[spec]["cpu_seconds"].append(time.process_time() - cpu)
            out[spec]["iterations"].append(it)
        loads.append(loadavg()[0] if loadavg() else None)
    return {"per_spec": out, "loadavg_1min": loads}


def measure_in_process(case: Case, specs: list[str], repeats: int) -> dict:
    """Memory (each spec after its warm-up) then timings, in this process: {spec: measurements}."""
    runner = Runner(case)
    memory = {}
    for spec in specs:
        try:
            memory[spec] = memory_of(runner, spec)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            memory[spec] = {"error": f"out of memory: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        except Exception as exc:  # one failing method must not cost the others (or a GPU lease)
            memory[spec] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
    ok = [s for s in specs if "error" not in memory[s]]
    timing = {"per_spec": {}, "loadavg_1min": []}
    try:  # (each spec has run twice already: no other warm-up)
        timing = timings_of(runner, ok, repeats, warm_up=False) if ok else timing
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        timing["error"] = f"out of memory while timing: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    except Exception as exc:
        timing["error"] = f"timing: {type(exc).__name__}: {str(exc)[:200]}"
    return {"memory": memory, "timing": timing}


# -- fresh processes (CPU) -----------------------------------------------------------------------------


def _case_of(job: dict) -> Case:
    if job["model"] == "embedded":
        return embedded_case(job["batch"], job.get("steps"))
    if job["model"] == "sd15-reduced":
        return family_case("sd15", True, "cpu", torch.float32, job["batch"], "dpmpp2m", job.get("steps") or 20)
    raise ValueError(f"unknown model {job['model']!r}; use one of {', '.join(MODELS)}")


def job_memory(job: dict) -> dict:
    return memory_of(Runner(_case_of(job)), job["spec"])


def job_timing(job: dict) -> dict:
    case = _case_of(job)
    return {**timings_of(Runner(case), job["specs"], job["repeats"]), "settings": case.settings}


JOBS = {"memory": job_memory, "timing": job_timing}


def measure_fresh(job: dict, specs: list[str], repeats: int, log=print) -> dict:
    """Memory of each spec in its own forked process, the timings in one more."""
    from .zygote import Zygote

    memory = {}
    with Zygote("adjointdpm.bench.finetune_cost") as zygote:
        for spec in specs:
            memory[spec] = zygote.run({**job, "job": "memory", "spec": spec}, timeout=1800)
            log(f"  memory {job['model']:>12} {spec:<18} "
                + (f"{memory[spec]['peak_mib']:8.1f} MiB" if "peak_mib" in memory[spec] else memory[spec]["error"]))
        ok = [s for s in specs if "error" not in memory[s]]
        timing = zygote.run({**job, "job": "timing", "specs": ok, "repeats": repeats}, timeout=3600) if ok else {}
    if "error" in timing:
        raise RuntimeError(f"the timing process failed: {timing['error']}\n{timing.get('traceback', '')}")
    return {"memory": memory, "timing": timing}


# -- rows, ratios, table ----------------------------------------------------------------------------


def rows_of(model: str, specs: list[str], measured: dict) -> list[dict]:
    """One row per spec: counts, seconds, peak memory and their ratios to the plain sample's."""
    rows = []
    per_spec = measured["timing"].get("per_spec", {})
    for spec in specs:
        mem, tim = measured["memory"].get(spec, {}), per_spec.get(spec)
        row = {"model": model, "method": spec}
        if "error" in mem or tim is None:
            row["status"] = mem.get("error") or measured["timing"].get("error") or "not timed"
            rows.append(row)
            continue
        its = tim["iterations"]
        row.update(status="ok", forward_calls=statistics.mean(i["forward"] for i in its),
                   vjp_calls=statistics.mean(i["vjp"] for i in its),
                   calls_per_iteration=[i["forward"] + i["vjp"] for i in its],
                   stats_per_iteration=[i["stats"] for i in its], finite=all(i["finite"] for i in its),
                   seconds=statistics.median(tim["seconds"]), seconds_all=tim["seconds"],
                   cpu_seconds=statistics.median(tim["cpu_seconds"]), cpu_seconds_all=tim["cpu_seconds"],
                   peak_mib=mem["peak_mib"], memory_method=mem["memory_method"],
                   memory_iteration=mem.get("memory_iteration"))
        if "peak_total_mib" in mem:
            row["peak_total_mib"] = mem["peak_total_mib"]
        row["model_calls"] = row["forward_calls"] + row["vjp_calls"]
        rows.append(row)
    base = next((r for r in rows if r["method"] == SAMPLE and r["status"] == "ok"), None)
    for row in rows:
        if base is not None and row["status"] == "ok":
            row["ratios"] = {key: _ratio(row[key], base[key]) for key in RATIO_KEYS}
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def markdown_table(rows: list[dict]) -> str:
    """| model | method | model calls (× sample) | seconds (× sample) | CPU s (× sample) | peak MiB (× sample) |"""
    lines = ["| model | method | model calls / iteration (× sample) | seconds (× sample) | CPU seconds (× sample) "
             "| peak MiB (× sample) |", "|---|---|---|---|---|---|"]
    for r in rows:
        label = "plain sample (no gradient)" if r["method"] == SAMPLE else f"`{r['method']}`"
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {label} | {r['status'][:80]} | | | |")
            continue
        q = r.get("ratios", {})
        calls = f"{r['model_calls']:g}" if float(r["model_calls"]).is_integer() else f"{r['model_calls']:.1f}"
        lines.append(f"| {r['model']} | {label} | {calls} ({q.get('model_calls', math.nan):.2f}) "
                     f"| {r['seconds']:.2f} ({q.get('seconds', math.nan):.2f}) "
                     f"| {r['cpu_seconds']:.2f} ({q.get('cpu_seconds', math.nan):.2f}) "
                     f"| {_mib(r['peak_mib'])} ({q.get('peak_mib', math.nan):.1f}) |")
    return "\n".join(lines)


def _mib(value: float) -> str:
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


# -- the command ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adjointdpm.bench.finetune_cost",
                                description="Model calls, seconds and peak memory of one iteration of each "
                                            "fine-tuning method, and their ratios to one plain sample of the same "
                                            "batch measured in the same run.")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--methods", default=",".join(METHOD_SPECS), help="method specs as finetune's --method takes them")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20, the embedded model's)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per method after one warm-up (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--in-process", action="store_true",
                   help="measure memory in the timing process after a warm-up (faster) instead of a fresh process "
                        "per method")
    p.add_argument("--out", default="outputs/bench/finetune_cost.json")
    p.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    return p


def main(argv=None) -> int:
    from .common import machine_info, write_report

    args = build_parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    specs = [SAMPLE] + [s.strip() for s in args.methods.split(",") if s.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or args.repeats < 1 or args.batch < 1:
        raise SystemExit(f"unknown model {bad} (use {', '.join(MODELS)}), or --repeats / --batch below 1")
    from ..finetuning import MethodError

    for spec in specs[1:]:
        try:
            parse_method(spec)
        except MethodError as e:
            raise SystemExit(f"--methods: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    result = {"suite": "finetune_cost", "machine": machine_info(), "device": "cpu",
              "options": vars(args), "settings": {}, "rows": [],
              "memory": ("peak RSS of one iteration above the RSS before it, after one warm-up iteration of the same "
                         "method, " + ("in the timing process" if args.in_process else "in a fresh process per method")
                         + " (common.PeakRSS)"),
              "seconds": f"median of {args.repeats} iterations after one warm-up, methods interleaved"}
    for model in models:
        print(f"{model}: {', '.join(specs)}", flush=True)
        job = {"model": model, "batch": args.batch, "steps": args.steps, "threads": args.threads}
        if args.in_process:
            case = _case_of(job)
            measured = measure_in_process(case, specs, args.repeats)
            result["settings"][model] = case.settings
        else:
            measured = measure_fresh(job, specs, args.repeats)
            result["settings"][model] = measured["timing"].get("settings")
        result["rows"] += rows_of(model, specs, measured)
        result.setdefault("loadavg_1min", {})[model] = measured["timing"].get("loadavg_1min")
    result["wall_s"] = time.time() - started
    table = markdown_table(result["rows"])
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    write_report(args.out, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
