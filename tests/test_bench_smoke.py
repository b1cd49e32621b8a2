"""A fast run of every benchmark code path (python -m adjointdpm.bench grad / cpu / budget / vae / gpu --reduced /
report) on tiny models: the numbers are meaningless, the plumbing and the checks are not."""

import json
import time

import numpy as np
import pytest
import torch

from adjointdpm.bench.__main__ import main
from adjointdpm.bench.common import PeakRSS, compare


def test_peak_rss_sees_torch_allocations():
    with PeakRSS() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert 56 <= peak.peak_mib <= 160, peak.peak_mib


def test_peak_rss_falls_back_to_sampling_where_clear_refs_does_nothing(monkeypatch):
    """A kernel that accepts the clear_refs write without resetting VmHWM is detected (the old peak would
    otherwise be read as this block's): the probe says so and PeakRSS samples RSS instead, still measuring."""
    from adjointdpm.bench import common

    monkeypatch.setattr(common, "_CLEAR_REFS_WORKS", None)
    monkeypatch.setattr(common, "_write_clear_refs", lambda: True)
    assert common.clear_refs_resets_high_water_mark() is False
    with PeakRSS() as peak:
        block = torch.ones(64 * 2**20 // 4)
        time.sleep(0.05)
        del block
    assert peak.method == "RSS sampled every 1 ms" and 56 <= peak.peak_mib <= 160, (peak.method, peak.peak_mib)


def test_compare():
    ref = torch.tensor([1.0, 2.0, 2.0])
    assert compare(ref, ref) == {"rel": 0.0, "cos": pytest.approx(1.0)}
    assert compare(-ref, ref)["rel"] == pytest.approx(2.0) and compare(-ref, ref)["cos"] == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    main(["cpu", "--models", "tiny", "--solvers", "ddim", "--steps", "2,4", "--threads", "1", "--wrt", "x_T,text,weights",
          "--modes", "backprop,exact,adjoint,reversible,odeint_adjoint", "--out", str(out / "cpu.json"),
          "--img", str(out / "img")])
    return json.loads((out / "cpu.json").read_text()), out


def test_sweep_measures_every_method(sweep):
    result, out = sweep
    rows = {(r["solver"], r["N"], r["mode"]): r for r in result["rows"]}
    for n in (2, 4):
        for mode in ("forward", "forward_edict", "backprop", "exact", "adjoint", "reversible", "odeint_adjoint"):
            row = rows["ddim", n, mode]
            assert row["status"] == "ok", row
            assert row["time_s"] > 0 and row["peak_mib"] >= 0
        for mode in ("backprop", "exact", "reversible"):  # float32 vs float64 back-propagation (EDICT's own)
            errors = rows["ddim", n, mode]["errors"]
            assert set(errors) == {"x_T", "text", "weights"}
            assert all(e["rel"] < 1e-4 and e["cos"] > 0.9999 for e in errors.values()), errors
        for mode in ("adjoint", "odeint_adjoint"):  # the continuous adjoint: biased at 2-4 steps, not broken
            err = rows["ddim", n, mode]["errors"]["x_T"]
            assert 1e-4 < err["rel"] < 2 and np.isfinite(err["cos"])
    # with Euler, torchdiffeq's adjoint is the engine's stored-state Euler adjoint
    odeint, adjoint = rows["ddim", 4, "odeint_adjoint"]["errors"], rows["ddim", 4, "adjoint"]["errors"]
    assert odeint["weights"]["rel"] == pytest.approx(adjoint["weights"]["rel"], rel=0.05)
    assert rows["ddim", 4, "backprop"]["peak_mib"] > rows["ddim", 4, "forward"]["peak_mib"]
    check = [r for r in result["references"] if r.get("reference_check")]
    assert check and all(v["rel"] < 1e-12 for r in check for v in r["reference_check"].values())
    ratios = result["ratios"]
    assert any(e["exact_over_backprop"] for e in ratios["per_n"])
    assert {g["mode"] for g in ratios["peak_growth"]} >= {"exact", "backprop"}
    assert sorted(p.name for p in (out / "img").iterdir()) == ["bench_error.png", "bench_memory.png", "bench_time.png"]


def test_report_reprints(sweep, capsys):
    _, out = sweep
    main(["report", str(out / "cpu.json")])
    text = capsys.readouterr().out
    assert "| exact | 4 |" in text and "time(exact)/time(backprop)" in text


def test_gpu_command_reduced_on_cpu(tmp_path, capsys):
    """Every family (UNets and flow transformers) samples and takes an x_T step; a decode row; LoRA and full."""
    main(["gpu", "--reduced", "--family", "sd15,sdxl,sd3,flux", "--targets", "forward,x_T", "--modes", "exact:inf",
          "--solvers", "ddim", "--ddim-steps", "2", "--vae-sizes", "64", "--out", str(tmp_path / "gpu.json")])
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] * (4 * (3 + 1 + 1)), [r["status"] for r in rows]
    steps = [r for r in rows if r["target"] == "x_T"]
    assert {r["family"] for r in steps} == {"sd15", "sdxl", "sd3", "flux"}
    assert all(r["s_per_step"] > 0 and np.isfinite(r["loss"]) and r["trainable_parameters"] > 0 for r in steps)
    assert "| flux | x_T | ddim, 2 | no |" in capsys.readouterr().out
    main(["gpu", "--reduced", "--family", "sdxl", "--targets", "text,lora,full", "--modes", "exact,exact:1MiB",
          "--solvers", "dpmpp2m", "--dpm-steps", "2", "--out", str(tmp_path / "gpu2.json")])
    rows = json.loads((tmp_path / "gpu2.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["status"] == "ok" and np.isfinite(r["loss"]) for r in rows), rows
    text = next(r for r in rows if r["target"] == "text")
    assert text["trainable_parameters"] == 2 * (4 * 32 + 40)  # cond and uncond: sequence and pooled embeddings


def test_budget_command(tmp_path):
    out = tmp_path / "budget.json"
    main(["budget", "--models", "tiny", "--steps", "3", "--fractions", "0,100", "--repeats", "1", "--threads", "1",
          "--out", str(out), "--img", str(tmp_path / "bench_budget.png")])
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"forward", "backprop", "exact, 0% of backprop's peak", "exact, 100% of backprop's peak",
                         "exact, memory=inf"}
    assert all(r["status"] == "ok" and r["time_s"] > 0 and r["peak_mib"] >= 0 for r in rows.values())
    # no budget: the backward pass recomputes the 3 steps; an unlimited one: none
    assert rows["exact, 0% of backprop's peak"]["backward_calls"] == 3
    assert rows["exact, 100% of backprop's peak"]["backward_calls"] <= 3
    assert rows["exact, memory=inf"]["backward_calls"] == 0
    for label in ("exact, 0% of backprop's peak", "exact, memory=inf"):
        assert all(e["rel"] < 1e-5 for e in rows[label]["errors_vs_backprop"].values())
    assert result["ratios"]["per_model"][0]["inf_over_backprop"] > 0
    assert (tmp_path / "bench_budget.png").stat().st_size > 0


def test_vae_command(tmp_path, capsys):
    out = tmp_path / "vae.json"
    main(["vae", "--config", "reduced", "--sizes", "64", "--threads", "1", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "diffusers", "checkpoint", "tiled"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["checkpoint"]["grad_vs_plain"]["rel"] < 1e-6  # the same function
    assert rows["tiled"]["grad_vs_plain"]["rel"] > 0  # a tiled decode is a different function (tiny tiles here)
    assert "| 64² | tiled (tile 4) |" in capsys.readouterr().out


def test_help_texts_say_what_each_suite_measures(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("grad", "cpu", "budget", "vae", "gpu", "report"):
        assert name in text
    assert "issue" not in text.lower()
    for name, words in (("budget", "of back-propagation's peak"), ("vae", "peak memory"), ("gpu", "torch.compile")):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert words in " ".join(text.split()) and "issue" not in text.lower()


def test_odeint_adjoint_with_heun_for_dpmpp2m():
    """The dpmpp2m counterpart (torchdiffeq heun2) gives a finite gradient for every group."""
    from adjointdpm.bench.common import PRESETS, build_setup
    from adjointdpm.bench.sweep import gradient

    torch.set_num_threads(1)
    setup = build_setup(PRESETS["tiny"], torch.float64)
    grads = gradient(setup, "odeint_adjoint", "dpmpp2m", 3, ["x_T", "text", "weights"])
    exact = gradient(setup, "exact", "dpmpp2m", 3, ["x_T", "text", "weights"])
    for group in ("x_T", "text", "weights"):
        assert torch.isfinite(grads[group]).all() and grads[group].shape == exact[group].shape
        assert compare(grads[group], exact[group])["cos"] > 0


def _documented_calls(method: str, n: int, stats: dict) -> tuple[int, int] | None:
    """(forward, VJP) network calls of one iteration as the methods document them (docs/finetune.md and the
    methods' docstrings); None where only bounds are documented (the continuous adjoint)."""
    if method == "sample":
        return n, 0
    if method == "exact":
        return 2 * n, n  # the sampling pass, its recomputation in the backward pass, one VJP per step
    if method.startswith("truncated:k=") or method.startswith("alignprop"):
        anchor = min(2, n) if "kl=" in method else 0  # the KL anchor: S forwards of each model, S VJPs
        return n + 2 * anchor, stats["k"] + anchor
    if method == "onestep":
        return stats["step"] + 1, 1
    if method == "adjoint-matching":  # sampling + lean adjoint down to ã_{lowest} + one μ_base below it + the loss
        picked = stats["steps"]
        lowest = min(picked) + 1
        return n + (n - lowest) + 1 + len(picked), (n - lowest) + len(picked)
    return None


def test_finetune_cost_command(tmp_path, capsys):
    """Every method's iteration on the SD-1.5-shaped reduced UNet (memory in a fresh process each): finite
    ratios to the plain sample, and the measured calls are the documented ones (exact: 3 N)."""
    from adjointdpm.bench.finetune_cost import METHOD_SPECS
    from adjointdpm.bench.finetune_cost import main as finetune_cost

    n = 2
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    finetune_cost(["--models", "sd15-reduced", "--steps", str(n), "--batch", "1", "--repeats", "1",
                   "--threads", "1", "--out", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["sample", *METHOD_SPECS]
    for method, row in rows.items():
        assert row["status"] == "ok" and row["finite"], row
        assert all(np.isfinite(v) and v > 0 for v in row["ratios"].values()), row["ratios"]
        (stats,) = row["stats_per_iteration"]
        documented = _documented_calls(method, n, stats)
        if documented is None:
            assert row["forward_calls"] >= n and row["vjp_calls"] >= n - 1, row
        else:
            assert (row["forward_calls"], row["vjp_calls"]) == documented, (method, row, stats)
    assert rows["sample"]["ratios"] == {"model_calls": 1.0, "seconds": 1.0, "cpu_seconds": 1.0, "peak_mib": 1.0}
    assert rows["exact"]["ratios"]["model_calls"] == 3.0
    assert rows["truncated:k=2"]["model_calls"] == n + 2
    assert result["settings"]["sd15-reduced"]["latent_shape"] == [4, 8, 8]
    assert "| sd15-reduced | `exact` | 6 (3.00) |" in md.read_text()
    assert all(r["memory_method"] == rows["sample"]["memory_method"] for r in rows.values())
    assert "fresh process per method" in result["memory"]


def test_gpu_finetune_target_reduced_on_cpu(tmp_path, capsys):
    main(["gpu", "--reduced", "--family", "sd15", "--targets", "finetune", "--methods", "exact,onestep",
          "--solvers", "ddim", "--ddim-steps", "2", "--out", str(tmp_path / "gpu.json")])
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [(r["mode"], r["status"]) for r in rows] == [("sample", "ok"), ("exact", "ok"), ("onestep", "ok")], rows
    assert rows[1]["model_calls"] == 6 and rows[1]["ratios"]["model_calls"] == 3.0
    assert all(r["s_per_step"] > 0 and r["peak_mib"] > 0 and r["batch"] == 1 for r in rows)
    assert "| sd15 | ddim, 2 | exact | 6 (3.00) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--methods"):
        main(["gpu", "--reduced", "--targets", "finetune", "--methods", "draft"])


def test_the_finetune_doc_table_is_the_one_its_measurements_give(tmp_path):
    """docs/finetune.md's recipe table is what bench.finetune_seeds makes of docs/bench/finetune_table.json (the
    scored runs): a row edited by hand, or measurements added without regenerating the table, fail here."""
    from pathlib import Path

    from adjointdpm.bench.finetune_seeds import main as finetune_seeds
    from adjointdpm.bench.finetune_seeds import recipe_key

    root = Path(__file__).resolve().parents[1]
    md = tmp_path / "table.md"
    finetune_seeds([str(root / "docs/bench/finetune_table.json"), "--markdown", str(md)])
    table = md.read_text().strip()
    assert table.count("\n") >= 3 and table in (root / "docs/finetune.md").read_text()
    row = {"method": "alignprop:mean=0.84,std=0.1,kl=3.0,kl_steps=2", "lr": 5e-4, "iterations": 400}
    assert recipe_key(row) == "alignprop, lr 0.0005, KL anchor β 3, 400 it"
