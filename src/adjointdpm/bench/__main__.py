"""``python -m adjointdpm.bench [grad|cpu|gpu|report] …`` (no subcommand = ``grad``, issue 2's benchmark)."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adjointdpm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    g = sub.add_parser("grad", help="issue 2: every grad mode × N on a 64×64 UNet (the default command)")
    _common_sweep_args(g, "outputs/bench/grad.json",
                       "backprop,checkpoint,exact,adjoint,adjoint_stored,truncated,reversible", "x_T,text")
    g.add_argument("--model", default="unet64", help="model preset (unet64, unet64-large, tiny, embedded)")
    g.add_argument("--solver", default="ddim", help="ddim, dpmpp2m or heun (default ddim)")

    c = sub.add_parser("cpu", help="issue 5: CPU suite vs backprop, checkpoint, truncated, EDICT, torchdiffeq")
    _common_sweep_args(c, "outputs/bench/cpu.json",
                       "backprop,checkpoint,exact,adjoint,adjoint_stored,truncated,reversible,odeint_adjoint",
                       "x_T,text,weights")
    c.add_argument("--models", default="unet64,embedded",
                   help="model presets; 'embedded' is skipped with a note if the embedded model is not available")
    c.add_argument("--solvers", default="ddim,dpmpp2m")
    c.add_argument("--quick", action="store_true", help="N ∈ {10, 25} and the random UNet only (~5 min)")
    c.add_argument("--img", default="outputs/bench/img", help="where the PNG plots go")

    gp = sub.add_parser("gpu", help="issue 5: SD-1.5-sized GPU suite (peak GPU memory, s/step)")
    from .gpu import add_arguments

    add_arguments(gp)

    f = sub.add_parser("families", help="x_T and LoRA gradient cost (time, peak RSS) per model family on reduced "
                                          "configs: SD 1.5, SDXL, SD3, Flux, PixArt, beside the forward sample")
    from .families import add_arguments as add_family_arguments

    add_family_arguments(f)

    r = sub.add_parser("report", help="print the tables of a results JSON (and plot with --img)")
    r.add_argument("json")
    r.add_argument("--img", default=None)
    r.add_argument("--prefix", default="bench")
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
        if result.get("suite") != "gpu":
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
    return _sweep_command(args)


def _sweep_command(args) -> int:
    from .common import PRESETS, embedded_available, write_json
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
    cfg = SweepConfig(suite=suite, models=specs, solvers=solvers, steps=_ints(args.steps), modes=modes,
                      wrt=_csv(args.wrt), repeats=args.repeats, mem_limit_gib=args.mem_limit_gib,
                      threads=args.threads, mmap_threshold=args.mmap_threshold,
                      memory_only=args.memory_only, notes=notes)
    result = run_sweep(cfg, log=lambda msg: print(msg, flush=True))
    write_json(args.out, result)
    print()
    print(sweep_tables(result, markdown=False))
    print()
    print(targets_table(result, markdown=False))
    print(f"\nwrote {args.out} ({result['wall_s'] / 60:.1f} min)")
    if suite == "cpu":
        for path in plot_sweep(result, args.img):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
