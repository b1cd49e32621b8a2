"""``docs/results.md`` and ``docs/img/results_*.png`` from the measured results of ``reproduce``.

Nothing here is typed by hand: every number comes from the runs' summaries, every picture from the
images the runs wrote.
"""

from __future__ import annotations

import math
from pathlib import Path


LABELS = {"adjoint": "AdjointDPM (adjoint, backsolve)", "exact": "exact discrete adjoint", "backprop": "naive backprop",
          "checkpoint": "checkpointed backprop", "truncated": "truncated backprop (K=1)",
          "onestep": "one-step x̂₀ guidance", "reversible": "reversible EDICT (DOODL)",
          "adjoint-stored": "AdjointDPM (adjoint, stored states)"}
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def _f(x, digits=2, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.0f} %"
    return f"{x:.{digits}f}"


def _label(row: dict) -> str:
    return LABELS.get(row["method"], row["method"])


def _calls(row: dict) -> str:
    return f"{row['model_calls']['total']}"


def _method_table(rows: list[dict], columns: list[str], cells) -> list[str]:
    """One line per method: the budget columns every application shares, then ``columns`` filled by
    ``cells(row)``."""
    header = ["method", "iterations", "model calls", "seconds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([_label(row), str(row["iterations"]), _calls(row), f"{row['seconds']:.0f}",
                                        *cells(row)]) + " |")
    return lines


# ----------------------------------------------------------------------------------- pictures
def _img(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path))


def _panel_figure(panels: list[tuple[str, Path]], path: Path, cols: int | None = None, width: float = 3.2) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, p) for t, p in panels if Path(p).is_file()]
    cols = cols or len(panels)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, width * rows + 0.3), squeeze=False, dpi=100)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, p) in zip(axes.flat, panels):
        a = _img(p)
        ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _curves(results: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = []
    if "guide" in results and results["guide"]["baselines"]:
        d, rows = next(iter(results["guide"]["baselines"].items()))
        sets.append((f"guide (digit {d}): guide CE", rows, "loss"))
    if "audit" in results:
        sets.append(("audit (classifier): success rate", results["audit"]["baselines"], "success_rate"))
    if "stylize" in results:
        sets.append(("stylize: style + content loss", results["stylize"]["baselines"], "loss"))
    if "invert" in results:
        sets.append(("invert: MSE to targets (train)", results["invert"]["baselines"], "loss"))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), squeeze=False, dpi=100)
    for ax, (title, rows, key) in zip(axes[0], sets):
        for row in rows:
            pts = [(c["calls"], c[key]) for c in row["curve"] if key in c and math.isfinite(c[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=2, lw=1.2, label=row["method"])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("model calls (forward + backward)")
        ax.grid(alpha=0.3)
        if key == "loss" and title.startswith("stylize") is False:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


# ------------------------------------------------------------------------------------- tables
def _guide_section(res: dict, img: Path) -> tuple[list[str], list[str], str]:
    lines, head = [], []
    lines.append("| target digit | prompt | judge accuracy before | after (AdjointDPM) | Fréchet to real class before | after | real-vs-real floor | iterations | model calls |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for d, row in res["digits"].items():
        b, a = row["before"], row["after"]
        lines.append(f"| {d} | \"{row['settings']['prompt']}\" | {_f(b['judge_accuracy'], pct=True)} | **{_f(a['judge_accuracy'], pct=True)}** | "
                     f"{_f(b['frechet_to_class'], 1)} | {_f(a['frechet_to_class'], 1)} | {_f(a['frechet_floor_real'], 1)} | {row['iterations']} | {_calls(row)} |")
        head.append(f"| Vocabulary expansion (guide), digit {d} | judge accuracy for {d} | {_f(b['judge_accuracy'], pct=True)} | "
                    f"**{_f(a['judge_accuracy'], pct=True)}** | {_best(res['baselines'].get(d, []), 'judge_accuracy')} |")
    for d, rows in res["baselines"].items():
        lines += ["", f"Baselines at AdjointDPM's model calls (digit {d}):", "",
                  *_method_table(rows, ["judge accuracy after", "Fréchet to class after", "guide CE (last)"],
                                 lambda r: [_f(r["after"]["judge_accuracy"], pct=True),
                                            _f(r["after"]["frechet_to_class"], 1), _f(r["loss"]["last"], 3)])]
    lines += _seed_table(res.get("seeds") or {})
    panels = []
    for d, row in res["digits"].items():
        f = Path(row["folder"])
        panels += [(f"digit {d}: before (judge {_f(row['before']['judge_accuracy'], pct=True)})", f / "before" / "grid.png"),
                   (f"digit {d}: after (judge {_f(row['after']['judge_accuracy'], pct=True)})", f / "after" / "grid.png")]
    pic = _panel_figure(panels, img / "results_guide.png", cols=len(panels))
    return lines, head, pic


def _seed_table(seeds: dict) -> list[str]:
    """Per seed, the command with every default (`adjointdpm guide --target-class D --seed S`): the judge's
    accuracy, the Fréchet distance, the after-images flagged off the model's manifold, the time."""
    if not seeds:
        return []
    lines = ["", "Every default, ten seeds (`adjointdpm guide --target-class D -n 16 --seed S`; flagged: after-images "
             "whose denoising-error z-score exceeds the threshold, see docs/guide_robustness.md):", "",
             "| digit | seed | judge accuracy after | Fréchet to class after | flagged off-manifold | iterations | model calls | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for d, rows in seeds.items():
        for r in rows:
            lines.append(f"| {d} | {r['seed']} | {_f(r['judge_accuracy'], pct=True)} | {_f(r['frechet_to_class'], 1)} | "
                         f"{r['off_manifold'] if r['off_manifold'] is not None else '–'} | {r['iterations']} | "
                         f"{r['model_calls']} | {r['seconds']:.0f} |")
        acc = [r["judge_accuracy"] for r in rows if r["judge_accuracy"] is not None]
        fd = [r["frechet_to_class"] for r in rows if r["frechet_to_class"] is not None]
        if acc and fd:
            lines.append(f"| {d} | mean (min) | {_f(sum(acc) / len(acc), pct=True)} ({_f(min(acc), pct=True)}) | "
                         f"{_f(sum(fd) / len(fd), 1)} (max {_f(max(fd), 1)}) | "
                         f"{sum(r['off_manifold'] or 0 for r in rows)} | | | {sum(r['seconds'] for r in rows) / len(rows):.0f} |")
    return lines


def _best(rows: list[dict], key: str, lower: bool = False, pct: bool = True, digits: int = 2) -> str:
    cands = [r for r in rows[1:] if r["after"].get(key) is not None]
    if not cands:
        return "–"
    best = (min if lower else max)(cands, key=lambda r: r["after"][key])
    return f"{_f(best['after'][key], digits=digits, pct=pct)} ({best['method']})"


def _audit_section(res: dict, img: Path):
    rows = res["baselines"]
    main, safety = rows[0], res["safety"]
    a = main["after"]
    lines = [f"Classifier attack: {a['n_attacked']} of {a['n']} samples attacked (the guide and the judge agree on the "
             f"original), ℓ∞ budget ε = {a['eps']} around the original x_T. Success = the guide's label flips while the "
             "judge keeps the original label, measured on the attacked images re-generated from the final noises.", "",
             *_method_table(rows, ["success rate", "judge keeps label", "mean ℓ∞ used"],
                            lambda r: [_f(r["after"]["success_rate"], pct=True),
                                       _f(r["after"]["judge_keeps_label"], pct=True),
                                       _f(r["after"]["linf_mean_attacked"], 3)])]
    s = safety["after"]
    lines += ["", f"Safety-filter attack (AdjointDPM): {s['n_attacked']} of {s['n']} generations of the flagged concept's "
              f"prompt are flagged and judged as the concept; ε = {s['eps']}. Success = the filter passes the image while the "
              f"judge still sees the concept: **{_f(s['success_rate'], pct=True)}** "
              f"(flag rate {_f(safety['before']['flag_rate'], pct=True)} → {_f(s['flag_rate'], pct=True)}; "
              f"{safety['iterations']} iterations, {_calls(safety)} model calls)."]
    head = [f"| Security audit: classifier attack (ε = {a['eps']}, n = {a['n_attacked']}) | success rate | 0 % | "
            f"**{_f(a['success_rate'], pct=True)}** | {_best(rows, 'success_rate')} |",
            f"| Security audit: safety-filter attack (ε = {s['eps']}, n = {s['n_attacked']}) | success rate | 0 % | "
            f"**{_f(s['success_rate'], pct=True)}** | – |"]
    f, fs = Path(main["folder"]), Path(safety["folder"])
    pic = _panel_figure([("classifier attack: originals", f / "before" / "grid.png"),
                         (f"attacked (success {_f(a['success_rate'], pct=True)})", f / "after" / "grid.png"),
                         ("safety attack: originals", fs / "before" / "grid.png"),
                         (f"attacked (success {_f(s['success_rate'], pct=True)})", fs / "after" / "grid.png")],
                        img / "results_audit.png", cols=4)
    return lines, head, pic


def _stylize_section(res: dict, img: Path):
    rows = res["baselines"]
    main = rows[0]
    b, a = main["before"], main["after"]
    lines = ["Metrics on fresh prompts and noises (never trained on). Judge accuracy: the judge's label equals the "
             "prompt's digit; kept = after / before (bar: ≥ 85 %).", "",
             *_method_table(rows, [f"style loss after (before: {_f(b['style_loss'], 3)})",
                                   f"judge accuracy after (before: {_f(b.get('judge_accuracy'), pct=True)})", "kept"],
                            lambda r: [_f(r["after"]["style_loss"], 3), _f(r["after"].get("judge_accuracy"), pct=True),
                                       _f(_kept(r["after"], b), pct=True)])]
    kept = _kept(a, b)
    head = [f"| Stylization ({main['settings']['reference']} reference, {'LoRA r=' + str(main['settings']['lora_rank']) if main['settings']['lora_rank'] else 'full weights'}) "
            f"| style loss (judge accuracy kept) | {_f(b['style_loss'], 3)} | **{_f(a['style_loss'], 3)}** ({_f(kept, pct=True)}) | "
            f"{_best(rows, 'style_loss', lower=True, pct=False, digits=3)} |"]
    f = Path(main["folder"])
    pic = _panel_figure([("reference", f / "reference" / "grid.png"), ("untuned model", f / "before" / "grid.png"),
                         ("stylized (AdjointDPM)", f / "after" / "grid.png")], img / "results_stylize.png", cols=3)
    return lines, head, pic


def _kept(after: dict, before: dict) -> float | None:
    """Judge accuracy after stylization as a fraction of the untuned model's."""
    return after.get("judge_accuracy", 0) / before["judge_accuracy"] if before.get("judge_accuracy") else None


def _invert_section(res: dict, img: Path):
    rows = res["baselines"]
    main = rows[0]
    b, a = main["before"], main["after"]
    effect = main["settings"]["effect"]
    lines = [f"Effect: **{effect}**. PSNR (dB) to the targets; held-out noises were never used in the optimisation "
             "(their targets are the same effect applied to their own initial images).", "",
             *_method_table(rows, [f"PSNR train (initial: {_f(b['psnr_train'])})",
                                   f"PSNR held-out (initial: {_f(b.get('psnr_heldout'))})"],
                            lambda r: [_f(r["after"]["psnr_train"]), _f(r["after"].get("psnr_heldout"))])]
    head = [f"| Embedding inversion ({effect}) | PSNR held-out noises (dB) | {_f(b.get('psnr_heldout'))} | "
            f"**{_f(a.get('psnr_heldout'))}** | {_best(rows, 'psnr_heldout', pct=False)} |"]
    f = Path(main["folder"])
    pic = _panel_figure([("targets (train | held-out rows)", f / "targets" / "grid.png"),
                         ("initial embedding", f / "before" / "grid.png"),
                         ("learned embedding", f / "after" / "grid.png")], img / "results_invert.png", cols=3)
    return lines, head, pic


def _gradcheck_section(res: dict) -> list[str]:
    rows = res["rows"]
    steps = sorted({r["steps"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["steps"], r["method"]): r for r in rows}
    lines = [f"Cosine similarity between each mode's ∂L/∂x_T and the exact gradient of the sampler (guide loss for "
             f"digit 8, {res['n']} samples, guidance {res['guidance_scale']:g}; mean over samples, min in brackets), "
             "and the model calls one gradient costs:", "",
             "| method | " + " | ".join(f"{n} steps: cos (min) | calls" for n in steps) + " |",
             "|---|" + "---|---|" * len(steps)]
    for m in methods:
        cells = []
        for n in steps:
            r = by[(n, m)]
            cells.append(f"{r['cos_mean']:.3f} ({r['cos_min']:.2f}) | {r['calls']}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


SECTIONS = {"guide": ("Guided sampling / vocabulary expansion (`adjointdpm guide`)", _guide_section),
            "audit": ("Security auditing (`adjointdpm audit`)", _audit_section),
            "stylize": ("Stylization (`adjointdpm stylize`)", _stylize_section),
            "invert": ("Text-embedding inversion (`adjointdpm invert`)", _invert_section)}


def write_report(results: dict, meta: dict, out: Path, docs: Path) -> Path:
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    head = ["| application | metric | before | AdjointDPM | best baseline (equal model calls) |", "|---|---|---|---|---|"]
    body = []
    for app in meta["apps"]:
        title, fn = SECTIONS[app]
        lines, h, pic = fn(results[app], img)
        head += h
        body += ["", f"## {title}", "", *lines, "", f"![{app}](img/{pic})"]
    if "gradcheck" in results:
        body += ["", "## Gradient check: how close each mode is to the exact gradient", "",
                 *_gradcheck_section(results["gradcheck"])]
    curves = _curves(results, img / "results_curves.png")
    cmd = "adjointdpm reproduce" + ("" if meta["scale"] == "full" else f" --scale {meta['scale']}") + \
          ("" if meta["apps"] == ["guide", "audit", "stylize", "invert"] else f" --only {','.join(meta['apps'])}")
    per_app = ", ".join(f"{k} {v:.0f} s" for k, v in meta["seconds_per_application"].items())
    text = [
        "# Results: the four applications against their baselines",
        "",
        f"Every number and picture below was written by `{cmd}` (commit {meta['commit']}, scale `{meta['scale']}`), "
        f"in **{meta['seconds'] / 60:.1f} minutes** on this machine ({meta['threads']} torch threads, {meta['cpu']}, "
        f"torch {meta['torch']}; {per_app}). Sampler: {meta['solver']}, {meta['steps']} steps, the embedded model's "
        "guidance scale. Each run's own folder (images, `summary.json`, loss curve) is under the `--out` folder "
        "(default `outputs/reproduce`).",
        "",
        "Budget: AdjointDPM runs first; the number of model calls it used (every forward and every backward "
        "evaluation of the network, counted by hooks on the UNet) is the budget each baseline then gets, so a "
        "method with cheaper iterations (truncated backprop, naive backprop) runs more of them. The one-step x̂₀ "
        "baseline differentiates the loss on each step's one-step denoised estimate through that step's network "
        "call only (no backprop through the chain), mapping the x_t gradient to x_T by α_t/α_T.",
        "",
        "## Headline",
        "",
        README_START,
        *head,
        README_END,
        *body,
        "",
        "## Loss against model calls",
        "",
        f"![curves](img/{curves})",
        "",
    ]
    path = docs / "results.md"
    path.write_text("\n".join(text) + "\n")
    return path
