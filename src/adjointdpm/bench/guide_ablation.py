"""What each of guide's two manifold pieces buys, over seeds: the ablation table of docs/guide_robustness.md.

``adjointdpm guide`` keeps its results on the base model's manifold with two pieces (:mod:`adjointdpm.apps.manifold`):
the denoising-error prior w·relu(z) in the loss (``--manifold-weight``, 0.1) and keep-best that ranks an iterate
with z > 6 after every unflagged one (``--manifold-threshold``, 6; 0 switches it off). The four combinations:

* ``critic``: no prior, keep-best by the critic alone (``--manifold-weight 0 --manifold-threshold 0``: the
  earlier guide);
* ``prior``: the prior only (``--manifold-threshold 0``);
* ``flag``: flag-aware keep-best only (``--manifold-weight 0``);
* ``both``: the defaults.

Each is run as the command runs it (``adjointdpm guide --target-class D -n 16 --seed S`` with the options above,
the embedded digits model, every other default, the same sampler and gradient mode as ``adjointdpm reproduce``'s
seed table) for every digit and seed. Every after-image is then scored by the same flag (z > 6 against the
run's calibration: 64 plain samples of the prompt from the seed's calibration noises, the same for all four
variants), so the ``critic`` and ``prior`` variants, which do not flag, are counted like the others. Per variant
and digit: mean and min judge accuracy over seeds, max and mean Fréchet distance to the class (judge features),
flagged after-images, model calls (network forward + backward evaluations of the optimisation).

    OMP_NUM_THREADS=1 python -m adjointdpm.bench.guide_ablation --digits 8,9 --seeds 0-4 \\
        --json docs/bench/guide_ablation.json

The JSON is written after every run and read back on start: runs already in it are not repeated (extend
``--seeds`` to add seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

#: variant → the options that make it (every other option: guide's default)
VARIANTS = {
    "critic": {"manifold_weight": 0.0, "manifold_threshold": 0.0},
    "prior": {"manifold_threshold": 0.0},
    "flag": {"manifold_weight": 0.0},
    "both": {},
}
#: what each variant is, in the table
LABELS = {
    "critic": "no prior, keep-best by the critic (`--manifold-weight 0 --manifold-threshold 0`, the earlier guide)",
    "prior": "prior only (`--manifold-threshold 0`)",
    "flag": "flag-aware keep-best only (`--manifold-weight 0`)",
    "both": "prior + flag-aware keep-best (**the default**)",
}


def _ints(text: str) -> list[int]:
    """``0-4`` or ``0,1,2`` (or both, comma-separated)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


def run_one(variant: str, digit: int, seed: int, out: Path, n: int = 16, iters: int | None = None) -> dict:
    """One guide run of ``variant`` and its after-images' flags (threshold 6, the run's own calibration)."""
    from ..apps import guide
    from ..apps.loop import LoopConfig, run
    from ..apps.manifold import THRESHOLD
    from ..apps.reproduce import SCALES, Runner

    options = replace(SCALES["full"].guide, target_class=str(digit), n=n, **VARIANTS[variant])
    if iters is not None:
        options = replace(options, iters=iters)
    session = Runner(out, SCALES["full"], None, False, "guide").session("exact")
    task = guide.build(session, options, seed=seed)
    summary = run(task, LoopConfig(out=out, iters=options.iters, checkpoint_every=10**6, progress=False, seed=seed,
                                   overwrite=True))
    t0 = time.perf_counter()
    with torch.no_grad():
        latents = session.sample(task.result_x(), task.cond0)
        # the prior-only variant has the calibration (its flag threshold is off); the earlier guide has none
        check = task.manifold if task.manifold is not None else task.manifold_check(THRESHOLD)
        z = check.z(latents).float()
    after = summary["after"]
    return {"variant": variant, "digit": digit, "seed": seed, "n": n, "options": VARIANTS[variant],
            "judge_accuracy": after.get("judge_accuracy"), "frechet_to_class": after.get("frechet_to_class"),
            "flagged": int((z > THRESHOLD).sum()), "flagged_by_run": after.get("off_manifold_count"),
            "manifold_z_max": round(float(z.max()), 2), "flagged_iterates": flagged_iterates(summary),
            "model_calls": summary["model_calls"]["total"],
            "iterations": summary["iterations"], "seconds": round(summary["seconds"], 1),
            "flag_seconds": round(time.perf_counter() - t0, 1)}


def flagged_iterates(summary: dict) -> int | None:
    """How many (iteration, sample) iterates the run's own flag fired on (None: the variant does not flag)."""
    history = summary["loss"]["history"]
    if not summary["settings"].get("manifold_threshold") or not any("off_manifold" in h for h in history):
        return None
    return int(round(sum(h.get("off_manifold", 0.0) * h.get("active", 0.0) for h in history)))


def aggregate(rows: list[dict]) -> list[dict]:
    """Per variant and digit (and both digits together): the statistics over seeds."""
    table = []
    for variant in VARIANTS:
        for digit in sorted({r["digit"] for r in rows}) + ["all"]:
            sel = [r for r in rows if r["variant"] == variant and (digit == "all" or r["digit"] == digit)]
            if not sel:
                continue
            acc = [r["judge_accuracy"] for r in sel]
            fd = [r["frechet_to_class"] for r in sel]
            calls = [r["model_calls"] for r in sel]
            table.append({"variant": variant, "digit": digit, "seeds": sorted({r["seed"] for r in sel}),
                          "runs": len(sel), "judge_accuracy_mean": sum(acc) / len(acc), "judge_accuracy_min": min(acc),
                          "frechet_max": max(fd), "frechet_mean": sum(fd) / len(fd),
                          "flagged": sum(r["flagged"] for r in sel), "images": sum(r["n"] for r in sel),
                          "flagged_iterates": (None if any(r.get("flagged_iterates") is None for r in sel)
                                               else sum(r["flagged_iterates"] for r in sel)),
                          "model_calls_mean": sum(calls) / len(calls), "model_calls_total": sum(calls)})
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| variant | digit | seeds | judge accuracy mean (min) | Fréchet to class max (mean) "
             "| flagged after-images | iterates the run flagged | model calls per run (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        seeds = t["seeds"]
        contiguous = seeds == list(range(seeds[0], seeds[-1] + 1))
        span = f"{seeds[0]}–{seeds[-1]}" if contiguous else ",".join(map(str, seeds))
        iterates = "—" if t["flagged_iterates"] is None else t["flagged_iterates"]
        lines.append(f"| {t['variant']} | {t['digit']} | {span} | {100 * t['judge_accuracy_mean']:.1f} % "
                     f"({100 * t['judge_accuracy_min']:.0f} %) | {t['frechet_max']:.1f} ({t['frechet_mean']:.1f}) | "
                     f"{t['flagged']} / {t['images']} | {iterates} | {t['model_calls_mean']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="guide's manifold pieces ablated over seeds on the embedded digits model")
    ap.add_argument("--digits", default="8,9", help="target digits (default 8,9)")
    ap.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,3,7 (default 0-4)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--n", type=int, default=16, help="images (noises) per run (default 16)")
    ap.add_argument("--iters", type=int, default=None, help="iterations (default: guide's, 20)")
    ap.add_argument("--json", type=Path, default=Path("outputs/bench/guide_ablation.json"))
    ap.add_argument("--out", type=Path, default=Path("outputs/guide_ablation"), help="the runs' folders")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; use {', '.join(VARIANTS)}")
    rows = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
    for r in rows:  # (rows of an earlier version of this table: the count from their run folders)
        folder = args.out / r["variant"] / f"digit_{r['digit']}" / f"seed_{r['seed']}"
        if "flagged_iterates" not in r and (folder / "summary.json").exists():
            r["flagged_iterates"] = flagged_iterates(json.loads((folder / "summary.json").read_text()))
    done = {(r["variant"], r["digit"], r["seed"], r["n"]) for r in rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():
        meta = {"command": "python -m adjointdpm.bench.guide_ablation", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "labels": LABELS}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "table": aggregate(rows)}, indent=1) + "\n")

    for seed in _ints(args.seeds):  # seed-major: a partial run has every variant on its first seeds
        for digit in _ints(args.digits):
            for variant in variants:
                if (variant, digit, seed, args.n) in done:
                    continue
                row = run_one(variant, digit, seed, args.out / variant / f"digit_{digit}" / f"seed_{seed}", args.n,
                              args.iters)
                rows.append(row)
                print(f"{variant:<7} digit {digit} seed {seed}: judge {row['judge_accuracy']:.2f} "
                      f"fd {row['frechet_to_class']:.1f} flagged {row['flagged']} calls {row['model_calls']} "
                      f"{row['seconds']:.0f} s", flush=True)
                save()
    save()
    print(markdown(aggregate(rows)))


if __name__ == "__main__":
    main()
