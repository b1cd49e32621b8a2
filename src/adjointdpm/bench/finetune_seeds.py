"""The fine-tuning table over training seeds: the rows of :mod:`.finetune_table`'s JSON grouped by recipe.

``finetune_table`` scores each run on fresh seeds (32 images per digit prompt from seed 7). This groups the
runs of one recipe (method, learning rate, λ, iterations) trained with different ``--seed`` and reports, over
those training seeds, the mean and the range of:

* accuracy of "eight" and of "nine", and the lowest accuracy among "zero" … "seven";
* diversity kept on "zero" … "seven": the mean over those eight prompts of D_run(d) / D_base(d), with D the
  mean pairwise distance of the judge's features within a prompt. The base model already draws these digits,
  so its diversity is the reference;
* diversity of "eight" and "nine" against real data: D_run(d) / D_real(d), D_real the same statistic on the
  real held-out images of digit d. (The base model's own diversity on those prompts mixes several digit
  classes and is no reference for a model that draws the right one; for scale, the base model's
  D_base(d) / D_real(d) on "zero" … "seven" is printed in the base row.)
* Fréchet distance of the judge's features to the real held-out images of the digit, mean over the ten
  digits and the worst digit;
* the off-manifold flags where the table has them.

    python -m adjointdpm.bench.finetune_seeds TABLE.json [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

from ..embedded.data import WORDS
from ..finetuning.kl_anchor import DEFAULT_ANCHOR_STEPS

KNOWN = WORDS[:8]
NEW = WORDS[8:]


def real_diversity() -> dict[str, float]:
    """D_real(d): the mean pairwise distance of the judge's features of the real held-out images of digit d."""
    import torch

    from ..embedded.critics import load_critics
    from ..embedded.data import load_data
    from ..rewards import pairwise_mean_distance

    critics = load_critics()
    x, y = load_data().held_out
    with torch.no_grad():
        feats = critics.judge.features(x)
    return {WORDS[d]: pairwise_mean_distance(feats[y == d]) for d in range(10)}


def method_options(spec: str) -> tuple[str, dict]:
    """A run's ``--method`` spec as ``parse_method`` reads it: (name, every option with its value)."""
    from ..finetuning import parse_method

    method = parse_method(spec)
    return method.name, method.options()


def recipe_key(row: dict) -> str:
    name, options = method_options(row["method"])
    key = f"{name}, lr {row['lr']:g}"
    if row.get("lr_scheduler", "constant") != "constant":
        key += f" {row['lr_scheduler']}"
        if row.get("lr_warmup_steps"):
            key += f" (warm-up {row['lr_warmup_steps']})"
    if name == "adjoint-matching":
        key += f", λ {options['reward_scale']:g}"
        if options["guidance"] == "all":
            key += ", guidance=all"
    if "kl" in options:
        key += f", KL anchor β {options['kl']:g}"
        if options.get("kl_steps", DEFAULT_ANCHOR_STEPS) != DEFAULT_ANCHOR_STEPS:
            key += f" at {options['kl_steps']} points"
    if row.get("max_grad_norm"):
        key += f", --max-grad-norm {row['max_grad_norm']:g}"
    key += f", {row['iterations']} it"
    return key + (", --keep-best" if row.get("keep_best") is not None else "")


def row_metrics(row: dict, base: dict, real: dict[str, float]) -> dict:
    acc, div, fd = row["accuracy"], row["diversity"], row["frechet"]
    out = {"eight": acc["eight"], "nine": acc["nine"], "min_known": min(acc[w] for w in KNOWN),
           "kept_known": sum(div[w] / base["diversity"][w] for w in KNOWN) / len(KNOWN),
           "eight_vs_real": div["eight"] / real["eight"], "nine_vs_real": div["nine"] / real["nine"],
           "fd_mean": row["mean_frechet"], "fd_max": max(fd.values())}
    if "flagged" in row:
        out["flagged"] = row["flagged"] if isinstance(row["flagged"], (int, float)) else sum(row["flagged"].values())
    return out


def aggregate(table: dict, real: dict[str, float]) -> tuple[dict, "OrderedDict[str, list[dict]]"]:
    rows = table["rows"]
    base = next(r for r in rows if r["run"] == "base")
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        if r["run"] == "base":
            continue
        groups.setdefault(recipe_key(r), []).append({"seed": r["seed"], "calls": r["model_calls"],
                                                     "kept": r.get("keep_best"),
                                                     **row_metrics(r, base, real)})
    base_metrics = row_metrics(base, base, real)
    base_metrics["base_known_vs_real"] = sum(base["diversity"][w] / real[w] for w in KNOWN) / len(KNOWN)
    return base_metrics, groups


def _cell(values: list[float], fmt: str, percent: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    mean = sum(values) / len(values) * scale
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values) * scale, fmt)}–{format(max(values) * scale, fmt)})"


def markdown(base: dict, groups: dict) -> str:
    head = ("| recipe | training seeds | model calls | eight | nine | lowest of 0–7 | diversity kept, 0–7 | "
            "diversity vs real, 8 / 9 | FD mean | FD worst digit | off-manifold images (of 320) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(f"| base model | — | — | {base['eight'] * 100:.0f} | {base['nine'] * 100:.0f} | "
                 f"{base['min_known'] * 100:.0f} | 100 % (base vs real on 0–7: {base['base_known_vs_real'] * 100:.0f} %) "
                 f"| {base['eight_vs_real'] * 100:.0f} / {base['nine_vs_real'] * 100:.0f} % (mixed digits) | "
                 f"{base['fd_mean']:.1f} | {base['fd_max']:.1f} | {base.get('flagged', '–')} |")
    for key, runs in groups.items():
        seeds = ", ".join(str(r["seed"]) for r in runs)
        calls = round(sum(r["calls"] for r in runs) / len(runs))
        col = lambda k: [r[k] for r in runs]  # noqa: E731
        lines.append(f"| `{key}` | {seeds} | {calls} | {_cell(col('eight'), '.0f', True)} | "
                     f"{_cell(col('nine'), '.0f', True)} | {_cell(col('min_known'), '.0f', True)} | "
                     f"{_cell(col('kept_known'), '.0f', True)} % | {_cell(col('eight_vs_real'), '.0f', True)} / "
                     f"{_cell(col('nine_vs_real'), '.0f', True)} % | {_cell(col('fd_mean'), '.1f')} | "
                     f"{_cell(col('fd_max'), '.1f')} | "
                     f"{', '.join(str(r.get('flagged', '–')) for r in runs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="group finetune_table rows by recipe over training seeds")
    ap.add_argument("table", type=Path, help="the JSON written by python -m adjointdpm.bench.finetune_table --json")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    base, groups = aggregate(json.loads(args.table.read_text()), real_diversity())
    text = markdown(base, groups)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
