"""``adjointdpm reproduce`` at its tiny scale: every run happens, results.md and the pictures are written,
and the report's numbers are the runs' numbers."""
from __future__ import annotations

import json

from test_tasks_cli import cli


def test_reproduce_tiny(tmp_path, capsys):
    out, docs = tmp_path / "out", tmp_path / "docs"
    code, stdout, err = cli(["reproduce", "--scale", "tiny", "--only", "guide,invert", "--out", out, "--docs", docs,
                             "--quiet"], capsys)
    assert code == 0, err
    md = (docs / "results.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert "adjointdpm reproduce --scale tiny --only guide,invert" in md
    assert "<!-- results:start -->" in md and "<!-- results:end -->" in md
    for f in ("results_guide.png", "results_invert.png", "results_curves.png"):
        assert (docs / "img" / f).stat().st_size > 1000
    # AdjointDPM first, then every baseline of the scale, each at no more model calls than AdjointDPM used
    rows = res["results"]["invert"]["baselines"]
    assert [r["method"] for r in rows] == ["adjoint", "truncated", "onestep"]
    budget = rows[0]["model_calls"]["total"]
    assert all(r["model_calls"]["total"] <= budget for r in rows[1:]) and rows[1]["iterations"] > rows[0]["iterations"]
    # the table rows are the summaries' numbers
    a = rows[0]["after"]
    assert f"| AdjointDPM (adjoint, backsolve) | {rows[0]['iterations']} | {budget} |" in md
    assert f"{a['psnr_train']:.2f}" in md
    guide = res["results"]["guide"]["digits"]["8"]
    assert f"{100 * guide['after']['judge_accuracy']:.0f} %" in md
    seeds = res["results"]["guide"]["seeds"]["8"]  # the command's defaults per seed, with the off-manifold count
    assert [r["seed"] for r in seeds] == [0, 1] and all(isinstance(r["off_manifold"], int) for r in seeds)
    assert f"| 8 | 1 | {100 * seeds[1]['judge_accuracy']:.0f} % | {seeds[1]['frechet_to_class']:.1f} | {seeds[1]['off_manifold']} |" in md
    for row in rows:  # each run is an ordinary application run with its own outputs
        assert (out / "invert" / row["method"] / "summary.json").is_file()
