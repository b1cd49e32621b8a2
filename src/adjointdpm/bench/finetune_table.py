"""The fine-tuning table of docs/finetune.md: ``finetune`` runs on the embedded model, measured on fresh seeds.

For the base model and each run folder (its LoRA or unet/ loaded with :func:`adjointdpm.apps.weights.load_weights`)
``n`` images per digit prompt are sampled from seed ``--seed`` (fresh: neither the training noises, drawn from
the iteration generators, nor the evaluation noises, seed + 104729) with the run's sampler settings, and scored
by the digits model's independent judge (never optimised):

* accuracy per digit: the fraction of prompt d's images the judge classifies as d;
* diversity per digit: the mean pairwise distance of the judge's features of prompt d's images, and its ratio
  to the base model's;
* Fréchet distance per digit: judge features of prompt d's images against the real held-out images of digit d
  (few real images per class: comparable between rows, not an absolute FID);
* flagged: the images off the base model's manifold (:mod:`adjointdpm.apps.manifold`: the base model's
  denoising error, z > 6 against the base model's own images of the table, its n per digit prompt; the base
  row's count is the flag's false positives on its calibration images), in all and per digit;
* from the run's summary.json: method, iterations, training model calls and seconds.

    python -m adjointdpm.bench.finetune_table RUN... [--n 32] [--seed 7] [--json FILE] [--grids DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .finetune_seeds import recipe_key


def measure(run: Path | None, n: int = 32, seed: int = 7, steps: int | None = None, solver: str | None = None,
            guidance_scale: float | None = None) -> dict:
    """Judge accuracy, diversity and Fréchet distance per digit of the base model (``run`` None) or a run."""
    from ..apps.weights import load_weights
    from ..components import load_components
    from ..embedded.critics import feature_stats, frechet_distance, load_critics
    from ..embedded.data import WORDS, load_data, prompt_for
    from ..rewards import pairwise_mean_distance

    comps = load_components()
    if run is not None:
        load_weights(comps, run)
    critics = load_critics()
    prompts = [prompt_for(d) for d in range(10) for _ in range(n)]
    x_T = comps.noise(n, seed).repeat(10, 1, 1, 1)  # the same n noises for every digit
    latents = comps.generate(prompts, x_T=x_T, steps=steps, solver=solver, guidance_scale=guidance_scale, decode=False)
    images = torch.cat([comps.decode(latents[i:i + 256]).float() for i in range(0, latents.shape[0], 256)]).clamp(-1, 1)
    real_x, real_y = load_data().held_out
    out = {"accuracy": {}, "diversity": {}, "frechet": {}}
    with torch.no_grad():
        pred = critics.judge(images).argmax(-1)
        feats = critics.judge.features(images)
        real_feats = critics.judge.features(real_x)
    for d in range(10):
        rows = slice(d * n, (d + 1) * n)
        out["accuracy"][WORDS[d]] = float((pred[rows] == d).float().mean())
        out["diversity"][WORDS[d]] = pairwise_mean_distance(feats[rows])
        real = real_feats[real_y == d]
        out["frechet"][WORDS[d]] = float(frechet_distance(*feature_stats(feats[rows]), *feature_stats(real)))
    for key in ("accuracy", "diversity", "frechet"):
        out[f"mean_{key}"] = sum(out[key].values()) / 10
    out["images"], out["latents"] = images, latents
    return out


class BaseModelFlag:
    """The off-manifold flag of the table's images: the base model's denoising error (its own DDIM grid of the
    default steps, no guidance), calibrated on the base model's images of the table (``calibrate`` with the
    base row's latents)."""

    def __init__(self, n: int):
        from ..apps.manifold import base_sampler
        from ..components import load_components
        from ..embedded.data import prompt_for

        comps = load_components()  # (a model of its own: the runs' weights are loaded into theirs)
        setup = comps.family_spec.sampling_setup(comps, int(comps.settings["default_steps"]), 1.0, with_uncond=False)
        self.sampler = base_sampler(comps.network, setup.schedule, setup.timesteps, comps.prediction_type)
        with torch.no_grad():
            self.cond = comps.encode_prompt([prompt_for(d) for d in range(10) for _ in range(n)], **setup.encode_kwargs)
        self.n, self.calibration = n, None

    def calibrate(self, base_latents: torch.Tensor) -> dict:
        from ..apps.manifold import calibrate

        self.calibration = calibrate(self.sampler, base_latents, self.cond)
        return self.calibration.describe()

    def flagged(self, latents: torch.Tensor) -> dict:
        """The flagged images in all and per digit."""
        from ..apps.manifold import flag_images
        from ..embedded.data import WORDS

        _, flags = flag_images(self.sampler, latents, self.cond, calibration=self.calibration)
        per = {WORDS[d]: int(flags[d * self.n:(d + 1) * self.n].sum()) for d in range(10)}
        return {"flagged": int(flags.sum()), "flagged_per_digit": per}


def run_record(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    points = s.get("evaluations", [])
    return {"run": str(run), "method": s["settings"]["method"], "lr": s["settings"]["lr"],
            "iterations": s["iterations"], "model_calls": s["model_calls"]["total"],
            "train_calls": points[-1]["calls"] if points else None,
            "train_seconds": points[-1]["seconds"] if points else None, "seconds": s["seconds"], "seed": s["seed"],
            "steps": s["settings"]["steps"], "solver": s["settings"]["solver"],
            "guidance_scale": s["settings"]["guidance_scale"], "batch": s["settings"]["batch"],
            "keep_best": (s.get("kept_best") or {}).get("iteration") if s["settings"].get("keep_best") else None,
            "max_grad_norm": s["settings"].get("max_grad_norm", 0.0),
            "lr_scheduler": s["settings"].get("lr_scheduler", "constant"),
            "lr_warmup_steps": s["settings"].get("lr_warmup_steps", 0)}


def plot_curves(runs: list[Path], path: Path) -> None:
    """The judge's reward and the diversity at each evaluation of each run, against its training model calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), dpi=100)
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        points = s["evaluations"]
        label = recipe_key(run_record(run))  # (the table's name for the run's recipe)
        calls = [p["calls"] for p in points]
        for ax, key in zip(axes, ("judge", "judge_accuracy", "diversity")):
            ax.plot(calls, [p[key] for p in points], marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("judge's reward (log p)", "judge accuracy (eval seeds)", "diversity (judge features)")):
        ax.set_xlabel("training model calls")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="measure finetune runs on the embedded model on fresh seeds")
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--n", type=int, default=32, help="images per digit prompt")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--grids", type=Path, default=None, help="write <name>.png grids (a row per digit) here")
    ap.add_argument("--curves", type=Path, default=None, help="write the runs' evaluation curves (the judge's "
                    "reward and diversity against training model calls) to this PNG")
    ap.add_argument("--skip-measure", action="store_true", help="only draw --curves")
    args = ap.parse_args(argv)
    if args.curves:
        plot_curves(args.runs, args.curves)
    if args.skip_measure:
        return
    from ..images import make_grid, save_png

    base = measure(None, args.n, args.seed)
    flag = BaseModelFlag(args.n)
    calibration = flag.calibrate(base["latents"])
    tensors = ("images", "latents")
    rows = [{"run": "base", "method": "(base model)", **{k: v for k, v in base.items() if k not in tensors},
             **flag.flagged(base["latents"])}]
    grids = {"base": base["images"]}
    for run in args.runs:
        rec = run_record(run)
        m = measure(run, args.n, args.seed, rec["steps"], rec["solver"], rec["guidance_scale"])
        m["diversity_kept"] = m["mean_diversity"] / base["mean_diversity"]
        rows.append({**rec, **{k: v for k, v in m.items() if k not in tensors}, **flag.flagged(m["latents"])})
        grids[run.name] = m["images"]
    for r in rows:
        acc = " ".join(f"{v:.2f}" for v in r["accuracy"].values())
        print(f"{r['method']:<40} calls {r.get('model_calls', 0)!s:>6} s {r.get('seconds', 0)!s:>7} acc [{acc}] "
              f"div {r['mean_diversity']:.3f} fd {r['mean_frechet']:.2f} flagged {r['flagged']}/{10 * args.n}")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "seed": args.seed, "manifold_calibration": calibration,
                                         "rows": rows}, indent=1) + "\n")
    if args.grids:
        args.grids.mkdir(parents=True, exist_ok=True)
        cols = min(args.n, 8)
        for name, images in grids.items():
            pick = torch.cat([images[d * args.n: d * args.n + cols] for d in range(10)])
            save_png(make_grid(pick, nrow=cols, zoom=4), args.grids / f"finetune_{name}.png")


if __name__ == "__main__":
    main()
