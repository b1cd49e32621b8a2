"""Measure the embedded model with its judge (the figures of docs/model.md and the quality tests).

For each digit d, ``n`` images are generated from the canonical prompt "a handwritten digit <word>"
and ``n_generic`` from the generic prompt "a handwritten digit"; the judge's argmax gives each
image (clamped to [-1, 1], as written to PNG) a class. Reported:

* ``rate[d]`` - fraction of images of prompt d classified as d (in-vocabulary bar: >= 0.9; the
  held-out words "eight"/"nine" should stay <= 0.3);
* ``generic_class_rates`` - class histogram of the generic prompt (bar: every class >= 0.03);
* Frechet distances on judge features against the held-out real digits: generated (generic prompt,
  the default guidance) vs real, and the real-vs-real floor stored at training time (same count);
* the safety filter's flag rate on the generated images of each prompt.

    python -m adjointdpm.embedded.evaluate [--model DIR] [--n 64] [--json FILE] [--grid FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .data import GENERIC_CAPTION, WORDS, prompt_for


def evaluate(path: str | None = None, images_per_prompt: int = 64, generic_images: int | None = None,
             digits=tuple(range(10)), seed: int = 0, guidance_scale: float | None = None,
             steps: int | None = None, solver: str | None = None, batch_size: int = 256) -> dict:
    from ..components import load_components
    from .critics import feature_stats, frechet_distance, load_critics

    comps = load_components(path)
    critics = load_critics(path)
    n = images_per_prompt
    n_gen = generic_images if generic_images is not None else max(2, 4 * n)
    prompts = [prompt_for(d) for d in digits for _ in range(n)] + [GENERIC_CAPTION] * n_gen
    t0 = time.time()
    # clamped to [-1, 1] as in the PNG files a user sees (the raw pixel-space samples overshoot a little)
    images = comps.generate(prompts, seed=seed, steps=steps, solver=solver, guidance_scale=guidance_scale,
                            batch_size=batch_size).clamp(-1, 1)
    seconds = time.time() - t0
    with torch.no_grad():
        pred = critics.judge(images).argmax(-1)
        flags = critics.safety.flag(images)
        gen = images[len(digits) * n:]
        fd = float(frechet_distance(critics.frechet.mu, critics.frechet.sigma, *feature_stats(critics.judge.features(gen))))
    rates, flag_rates = {}, {}
    for k, d in enumerate(digits):
        sl = slice(k * n, (k + 1) * n)
        rates[WORDS[d]] = float((pred[sl] == d).float().mean())
        flag_rates[WORDS[d]] = float(flags[sl].float().mean())
    gp = pred[len(digits) * n:]
    generic_rates = {WORDS[c]: float((gp == c).float().mean()) for c in range(10)}
    flag_rates["generic"] = float(flags[len(digits) * n:].float().mean())
    metrics = critics.config.get("metrics", {})
    summary = {
        "guidance_scale": comps.settings["default_guidance_scale"] if guidance_scale is None else guidance_scale,
        "steps": steps or comps.settings["default_steps"], "solver": solver or comps.settings["default_solver"],
        "images_per_prompt": n, "generic_images": n_gen,
        "judge_rate_per_prompt": rates, "generic_class_rates": generic_rates,
        "frechet_generated_generic_vs_heldout": fd,
        "frechet_real_vs_real_floor": metrics.get("frechet_real_vs_real_floor"),
        "judge_heldout_accuracy": metrics.get("judge_heldout_accuracy"),
        "safety_flag_rate_per_prompt": flag_rates, "sampling_seconds": round(seconds, 1),
    }
    return {"summary": summary, "images": images, "prompts": prompts, "predictions": pred}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="evaluate the embedded digits model with its judge")
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=64, help="images per digit prompt")
    ap.add_argument("--generic", type=int, default=None, help="images of the generic prompt (default 4n)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--solver", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--grid", default=None, help="write a grid (one row per digit prompt, then generic) here")
    args = ap.parse_args(argv)
    rep = evaluate(args.model, args.n, args.generic, seed=args.seed, guidance_scale=args.guidance,
                   steps=args.steps, solver=args.solver)
    print(json.dumps(rep["summary"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep["summary"], f, indent=2)
    if args.grid:
        from ..images import make_grid, save_png

        n, cols = args.n, min(args.n, 12)
        rows = [rep["images"][d * n: d * n + cols] for d in range(10)] + [rep["images"][10 * n: 10 * n + cols]]
        save_png(make_grid(torch.cat(rows), nrow=cols, zoom=4), args.grid)


if __name__ == "__main__":
    main()
