"""``python -m adjointdpm.bench [grad|cpu|budget|vae|gpu|report] …`` (no subcommand = ``grad``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_STEPS = "10,25,50,100"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in _csv(text)]


def _common_sweep_args(p: argparse.ArgumentParser, out: str, modes: str, wrt: str, steps: str = DEFAULT_STEPS):
    p.add_argument("--steps", default=steps, help=f"numbers of sampling steps N (default {steps})")
    p.add_argument("--modes", default=modes, help=f"methods to compare (default {modes})")
    p.add_argument("--wrt", default=wrt, help=f"what is differentiated: x_T,text,weights (default {wrt})")
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved timing rounds (default 1); the fastest of them and of the memory run is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    p.add_argument("--mem-limit-gib", type=float, default=10.0,
                   help="skip a method at N when its memory, projected from the previous N, exceeds this")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="memory runs only: fix glibc's mmap threshold (e.g. 65536) so peak RSS tracks live tensors")
    p.add_argument("--memory-only", action="store_true", help="only the fresh-process memory runs (no reference, no timing)")
    p.add_argument("--out", default=out, help=f"results JSON (default {out})")


DESCRIPTION = ("Benchmarks of adjointdpm's gradient modes: accuracy against float64 back-propagation, peak memory "
               "(fresh processes) and time, on CPU or on a CUDA device. Without a subcommand: grad.")
GRAD_HELP = ("every gradient mode × N on a 64×64 UNet (the default subcommand): relative error and cosine "
             "against a float64 back-propagation reference, peak RSS of one gradient in a fresh process, wall and "
             "CPU time, and the ratios time(exact)/time(backprop), time(grad)/time(forward), peak(N_max)/peak(N_min)")
CPU_HELP = ("the same sweep on several models (random 64×64 UNet, the embedded digits model) and solvers, with "
            "gradients for x_T, the text embeddings and all weights, and torchdiffeq's odeint_adjoint as an outside "
            "reference; writes a JSON and memory/time/error plots")
BUDGET_HELP = ("Exact(memory=B) against back-propagation at one N: peak RSS (fresh process) and time of one gradient "
               "for budgets of 0, 25, 50, 100 % of back-propagation's peak and an unlimited one, the backward "
               "pass's network calls (what was recomputed), the gradients' agreement, and "
               "time(Exact(memory=inf))/time(backprop); writes a JSON and a time-vs-memory plot")
VAE_HELP = ("differentiable VAE decoding (adjointdpm.vae.decode) with Stable Diffusion's VAE config and random "
            "weights: peak memory and time of decode + backward for plain, checkpointed and tiled decoding at the "
            "given resolutions, and the gradients' agreement with the plain decode")
GPU_HELP = ("model families (SD-1.5, SDXL UNets; SD3, Flux transformers) at their native sizes, random weights, on a "
            "CUDA device: peak GPU memory and seconds per step of plain sampling and of an optimisation step "
            "through the sampler for x_T, the text embeddings, LoRA adapters and the full weights, with and "
            "without torch.compile, plus a high-resolution VAE decode, and (--targets finetune) one LoRA fine-tuning "
            "iteration per method; --reduced runs tiny configs on a CPU")
FAMILIES_HELP = ("x_T and LoRA gradient cost per model family on reduced configs (SD 1.5, SDXL, SD3, Flux, PixArt "
                 "shapes, random weights, CPU): seconds and peak RSS of exact and backprop gradients beside the "
                 "forward sample")
REPORT_HELP = "re-print the tables of a results JSON of any suite (and draw its plots with --img)"


def _escaped(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adjointdpm.bench", description=DESCRIPTION,
                                     epilog="Each subcommand's --help says what it measures; docs/benchmarks.md has "
                                            "the measured results.")
    sub = parser.add_subparsers(dest="command", metavar="{grad,cpu,budget,vae,families,gpu,report}")

    g = sub.add_parser("grad", help=_escaped(GRAD_HELP), description=GRAD_HELP)
    _common_sweep_args(g, "outputs/bench/grad.json",
                       "backprop,checkpoint,exact,adjoint,adjoint_stored,truncated,reversible", "x_T,text")
    g.add_argument("--model", default="unet64", help="model preset (unet64, unet64-large, tiny, embedded)")
    g.add_argument("--solver", default="ddim", help="ddim, dpmpp2m or heun (default ddim)")

    c = sub.add_parser("cpu", help=_escaped(CPU_HELP), description=CPU_HELP)
    _common_sweep_args(c, "outputs/bench/cpu.json",
                       "backprop,checkpoint,exact,adjoint,adjoint_stored,truncated,reversible,odeint_adjoint",
                       "x_T,text,weights")
    c.add_argument("--models", default="unet64,embedded",
                   help="model presets; 'embedded' is skipped with a note if the embedded model is not available")
    c.add_argument("--solvers", default="ddim,dpmpp2m")
    c.add_argument("--quick", action="store_true", help="N ∈ {10, 25} and the random UNet only (~5 min)")
    c.add_argument("--img", default="outputs/bench/img", help="where the PNG plots go")

    b = sub.add_parser("budget", help=_escaped(BUDGET_HELP), description=BUDGET_HELP)
    b.add_argument("--models", default="unet64,embedded", help="model presets (default unet64,embedded)")
    b.add_argument("--steps", type=int, default=25, help="sampling steps N (default 25)")
    b.add_argument("--solver", default="ddim", help="ddim, dpmpp2m or heun (default ddim)")
    b.add_argument("--wrt", default="x_T,text", help="what is differentiated: x_T,text,weights (default x_T,text)")
    b.add_argument("--fractions", default="0,25,50,100", help="budgets in %% of backprop's peak (default 0,25,50,100)")
    b.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds (default 2); the fastest is reported")
    b.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    b.add_argument("--out", default="outputs/bench/budget.json", help="results JSON")
    b.add_argument("--img", default="outputs/bench/img/bench_budget.png", help="the time-vs-memory plot")

    v = sub.add_parser("vae", help=_escaped(VAE_HELP), description=VAE_HELP)
    from .vae import add_arguments as add_vae_arguments

    add_vae_arguments(v)

    gp = sub.add_parser("gpu", help=_escaped(GPU_HELP), description=GPU_HELP)
    from .gpu import add_arguments

    add_arguments(gp)

    f = sub.add_parser("families", help=_escaped(FAMILIES_HELP), description=FAMILIES_HELP)
    from .families import add_arguments as add_family_arguments

    add_family_arguments(f)

    r = sub.add_parser("report", help=_escaped(REPORT_HELP), description=REPORT_HELP)
    r.add_argument("json")
    r.add_argument("--img", default=None, help="folder for the plots")
    r.add_argument("--prefix", default="bench", help="file-name prefix of the plots")
    r.add_argument("--text", action="store_true", help="aligned text instead of markdown")

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["grad", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "report":
        from .report import plot_sweep, sweep_tables, targets_table

        result = json.loads(Path(args.json).read_text())
        if result.get("suite") == "budget":
            from .memory_budget_suite import budget_table, plot_budget

            print(budget_table(result))
            if args.img:
                print("wrote", plot_budget(result, Path(args.img) / f"{args.prefix}_budget.png"))
        elif result.get("suite") == "vae":
            from .vae import vae_table

            print(vae_table(result))
        elif result.get("suite") == "finetune_cost":
            from .finetune_cost import markdown_table

            print(markdown_table(result["rows"]))
        elif result.get("suite") != "gpu":
            print(sweep_tables(result, markdown=not args.text))
            print()
            print(targets_table(result, markdown=not args.text))
            if args.img:
                for path in plot_sweep(result, args.img, args.prefix):
                    print("wrote", path)
        else:
            from .gpu import gpu_table

            print(gpu_table(result))
        return 0
    if args.command == "families":
        from .families import main as families_main

        return families_main(args)
    if args.command == "gpu":
        from .gpu import main as gpu_main

        return gpu_main(args)
    if args.command == "budget":
        return _budget_command(args)
    if args.command == "vae":
        from .vae import main as vae_main

        return vae_main(args)
    return _sweep_command(args)


def _model_specs(names: list[str], notes: list[str]) -> list:
    """The model presets named; the embedded model is left out, with a note, where it is not available."""
    from .common import PRESETS, embedded_available

    specs = []
    for name in names:
        if name not in PRESETS:
            raise SystemExit(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        if PRESETS[name].kind == "embedded":
            ok, why = embedded_available()
            if not ok:
                notes.append(f"embedded digits model skipped: {why}")
                print("note:", notes[-1])
                continue
        specs.append(PRESETS[name])
    return specs


def _budget_command(args) -> int:
    from .memory_budget_suite import BudgetConfig, budget_table, plot_budget, run_budget
    from .common import write_report

    notes = []
    specs = _model_specs(_csv(args.models), notes)
    fractions = tuple(float(f) / 100 for f in _csv(args.fractions))
    cfg = BudgetConfig(models=specs, steps=args.steps, solver=args.solver, wrt=_csv(args.wrt), fractions=fractions,
                       repeats=args.repeats, threads=args.threads, notes=notes)
    result = run_budget(cfg, log=lambda msg: print(msg, flush=True))
    write_report(args.out, result, budget_table(result), minutes=True)
    if args.img:
        print("wrote", plot_budget(result, args.img))
    return 0


def _sweep_command(args) -> int:
    from .common import write_report
    from .modes import ALL_MODES
    from .report import plot_sweep, sweep_tables, targets_table
    from .sweep import SweepConfig, run_sweep

    modes = _csv(args.modes)
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(ALL_MODES)}")
    notes = []
    if args.command == "grad":
        names, solvers, suite = [args.model], [args.solver], "grad"
    else:
        names, solvers, suite = _csv(args.models), _csv(args.solvers), "cpu"
        if args.quick:
            args.steps = "10,25"
            names = [n for n in names if n != "embedded"]
            notes.append("--quick: N ∈ {10, 25}, random UNet only")
    specs = _model_specs(names, notes)
    cfg = SweepConfig(suite=suite, models=specs, solvers=solvers, steps=_ints(args.steps), modes=modes,
                      wrt=_csv(args.wrt), repeats=args.repeats, mem_limit_gib=args.mem_limit_gib,
                      threads=args.threads, mmap_threshold=args.mmap_threshold,
                      memory_only=args.memory_only, notes=notes)
    result = run_sweep(cfg, log=lambda msg: print(msg, flush=True))
    write_report(args.out, result, sweep_tables(result, markdown=False), targets_table(result, markdown=False),
                 minutes=True)
    if suite == "cpu":
        for path in plot_sweep(result, args.img):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
