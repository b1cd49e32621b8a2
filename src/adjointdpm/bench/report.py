"""Ratios, tables and plots from a sweep's JSON (the same code prints the console table and the docs)."""

from __future__ import annotations

import math
from pathlib import Path

from .modes import forward_kind

TARGETS = {
    "exact_over_backprop": 1.15,
    "grad_over_forward": 3.2,
    "peak_growth": 1.10,
    "exact_rel_err": 1e-5,
}
ENGINE_O1_MODES = ("exact", "adjoint")
GROUP_LABEL = {"x_T": "x_T", "text": "text", "weights": "weights"}


def _rows(result, **match):
    return [r for r in result["rows"] if all(r.get(k) == v for k, v in match.items())]


def _get(result, model, solver, n, mode):
    rows = _rows(result, model=model, solver=solver, N=n, mode=mode)
    return rows[0] if rows else None


def _time(row, key="time_s"):
    return None if row is None or key not in row else row[key]


def _div(a, b):
    return None if a is None or b is None or b == 0 else a / b


def ratios(result: dict) -> dict:
    """time(exact)/time(backprop) and time(grad)/time(forward) per N; peak(N_max)/peak(N_min) per method."""
    out = {"per_n": [], "peak_growth": [], "targets": TARGETS}
    keys = sorted({(r["model"], r["solver"]) for r in result["rows"]})
    for model, solver in keys:
        ns = sorted({r["N"] for r in _rows(result, model=model, solver=solver) if r["N"] is not None})
        modes = []
        for r in _rows(result, model=model, solver=solver):
            if r["mode"] not in modes:
                modes.append(r["mode"])
        for n in ns:
            entry = {"model": model, "solver": solver, "N": n}
            for key, suffix in (("time_s", ""), ("cpu_s", "_cpu")):
                backprop = _time(_get(result, model, solver, n, "backprop"), key)
                entry["exact_over_backprop" + suffix] = _div(_time(_get(result, model, solver, n, "exact"), key),
                                                             backprop)
                entry["over_backprop" + suffix], entry["over_forward" + suffix] = {}, {}
                for mode in modes:
                    if mode.startswith("forward"):
                        continue
                    t = _time(_get(result, model, solver, n, mode), key)
                    forward = _time(_get(result, model, solver, n, forward_kind(mode)), key)
                    entry["over_backprop" + suffix][mode] = _div(t, backprop)
                    entry["over_forward" + suffix][mode] = _div(t, forward)
            out["per_n"].append(entry)
        if len(ns) >= 2:
            for mode in modes:
                lo, hi = _get(result, model, solver, ns[0], mode), _get(result, model, solver, ns[-1], mode)
                growth = _div(hi.get("peak_mib") if hi else None, lo.get("peak_mib") if lo else None)
                out["peak_growth"].append({"model": model, "solver": solver, "mode": mode, "N_min": ns[0],
                                           "N_max": ns[-1], "ratio": growth})
    return out


# -- text tables -----------------------------------------------------------------------------------------


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def sweep_tables(result: dict, markdown: bool = True) -> str:
    """One table per (model, solver): a row per (method, N)."""
    groups = [g for g in ("x_T", "text", "weights") if g in result["config"]["wrt"]]
    out = []
    keys = []
    for r in result["rows"]:
        if (r["model"], r["solver"]) not in keys:
            keys.append((r["model"], r["solver"]))
    rat = {(e["model"], e["solver"], e["N"]): e for e in result.get("ratios", {}).get("per_n", [])}
    for model, solver in keys:
        head = ["method", "N", "s/grad", "CPU s", "s/opt-step", "×backprop", "×forward", "×fwd (CPU)", "peak MiB"]
        for g in groups:
            head += [f"rel.err {GROUP_LABEL[g]}", f"cos {GROUP_LABEL[g]}"]
        lines = [f"**{model}, solver {solver}** (gradient w.r.t. {', '.join(groups)})", ""]
        rows = []
        for r in _rows(result, model=model, solver=solver):
            e = rat.get((model, solver, r["N"]), {})
            cells = [r["mode"], _fmt(r["N"], "d")]
            if r["status"] != "ok" and "time_s" not in r:
                cells += [r["status"]] + [""] * (len(head) - 3)
                rows.append(cells)
                continue
            is_fwd = r["mode"].startswith("forward")
            cells += [_fmt(r.get("time_s"), ".2f"), _fmt(r.get("cpu_s"), ".2f"),
                      "" if is_fwd else _fmt(r.get("step_s"), ".2f"),
                      "" if is_fwd else _fmt(e.get("over_backprop", {}).get(r["mode"]), ".2f"),
                      "" if is_fwd else _fmt(e.get("over_forward", {}).get(r["mode"]), ".2f"),
                      "" if is_fwd else _fmt(e.get("over_forward_cpu", {}).get(r["mode"]), ".2f"),
                      _fmt(r.get("peak_mib"), ".1f" if (r.get("peak_mib") or 0) < 100 else ".0f")]
            for g in groups:
                err = (r.get("errors") or {}).get(g)
                cells += [_fmt(err and err["rel"], ".1e"), _fmt(err and err["cos"], ".6f")]
            if r["status"] != "ok":
                cells[-1] += f" ({r['status']})"
            rows.append(cells)
        lines += _table(head, rows, markdown)
        out.append("\n".join(lines))
    return "\n\n".join(out)


def targets_table(result: dict, markdown: bool = True) -> str:
    """The targets against the measured figures (met / missed)."""
    rat = result.get("ratios") or ratios(result)
    rows = []
    for e in rat["per_n"]:
        tag = f"{e['model']} {e['solver']} N={e['N']}"
        v, c = e["exact_over_backprop"], e.get("exact_over_backprop_cpu")
        rows.append([tag, "time(exact)/time(backprop)", f"≤ {TARGETS['exact_over_backprop']}", _fmt(v, ".3f"),
                     _verdict(v, TARGETS["exact_over_backprop"]), _fmt(c, ".3f"),
                     _verdict(c, TARGETS["exact_over_backprop"])])
        for mode in ENGINE_O1_MODES:
            v, c = e["over_forward"].get(mode), e.get("over_forward_cpu", {}).get(mode)
            rows.append([tag, f"time({mode})/time(forward)", f"≤ {TARGETS['grad_over_forward']}", _fmt(v, ".3f"),
                         _verdict(v, TARGETS["grad_over_forward"]), _fmt(c, ".3f"),
                         _verdict(c, TARGETS["grad_over_forward"])])
        row = _get(result, e["model"], e["solver"], e["N"], "exact")
        err = (row or {}).get("errors") or {}
        worst = max((v["rel"] for v in err.values() if v), default=None)
        rows.append([tag, "exact: rel. error vs float64 backprop (worst group)", f"≤ {TARGETS['exact_rel_err']:.0e}",
                     _fmt(worst, ".1e"), _verdict(worst, TARGETS["exact_rel_err"]), "", ""])
    for g in rat["peak_growth"]:
        if g["mode"] in ENGINE_O1_MODES:
            target, verdict = f"≤ {TARGETS['peak_growth']}", _verdict(g["ratio"], TARGETS["peak_growth"])
        elif g["mode"] == "backprop":
            target, verdict = "grows", "grows" if g["ratio"] and g["ratio"] > 2 else "does not grow"
        else:
            target, verdict = "(info)", ""
        rows.append([f"{g['model']} {g['solver']}", f"peak({g['mode']}, N={g['N_max']})/peak(N={g['N_min']})",
                     target, _fmt(g["ratio"], ".3f"), verdict, "", ""])
    head = ["where", "ratio", "target", "measured (wall)", "", "measured (CPU time)", ""]
    return "\n".join(_table(head, rows, markdown))


def _verdict(v, limit):
    if v is None:
        return "not measured"
    return "met" if v <= limit else "MISSED"


def _table(head, rows, markdown):
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return lines
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*head)] + [fmt.format(*[str(c) for c in row]) for row in rows]


# -- plots ---------------------------------------------------------------------------------------------


def plot_sweep(result: dict, img_dir: str | Path, prefix: str = "bench") -> list[Path]:
    """memory vs N, error vs N, time vs N: one PNG per quantity, one panel per (model, solver)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for r in result["rows"]:
        if r["N"] is not None and (r["model"], r["solver"]) not in keys:
            keys.append((r["model"], r["solver"]))
    quantities = {
        "memory": ("peak RSS above baseline (MiB)", lambda r: r.get("peak_mib")),
        "time": ("seconds per gradient", lambda r: r.get("time_s")),
        "error": ("relative error of ∂L/∂x_T vs float64 backprop",
                  lambda r: ((r.get("errors") or {}).get("x_T") or {}).get("rel")),
    }
    paths = []
    for name, (label, get) in quantities.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
        for ax, (model, solver) in zip(axes[0], keys):
            modes = []
            for r in _rows(result, model=model, solver=solver):
                if r["mode"] not in modes and r["N"] is not None:
                    modes.append(r["mode"])
            for mode in modes:
                pts = [(r["N"], get(r)) for r in _rows(result, model=model, solver=solver, mode=mode)]
                pts = [(n, v) for n, v in pts if n is not None and v is not None and v > 0]
                if not pts or (name == "error" and mode.startswith("forward")):
                    continue
                style = "--" if mode.startswith("forward") or mode in ("backprop", "checkpoint") else "-"
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=mode)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("sampling steps N")
            ax.set_ylabel(label)
            ax.set_title(f"{model}, {solver}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = img_dir / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
