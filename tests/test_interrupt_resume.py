"""A real ``adjointdpm guide`` process stopped mid-run, then resumed with ``--resume``:

* SIGINT (Ctrl-C): it finishes the running iteration, saves a checkpoint and exits with status 130;
* SIGKILL: nothing runs on the way out; the checkpoint on disk is still readable (atomic writes) and holds
  every completed iteration but the one being written at most (one checkpoint interval, K = 1 here).

Either way the resumed run equals an uninterrupted one: loss history, metrics and optimised noises bit for bit.
Both processes run side by side; each is signalled once its checkpoint shows iteration >= 2, with most of its
iterations still to go, and the resumed runs go to the same total.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import one_thread_env
from adjointdpm.cli import run as cli_run
from adjointdpm.apps.checkpoint import CheckpointFolder

ITERS = 30  # ~0.2 s each: the signal (sent after iteration 2) lands with most of the run still ahead
ARGS = ["guide", "-n", "2", "--steps", "3", "--grad", "exact", "--lr", "0.2", "--checkpoint-every", "1",
        "--optimizer", "adamw", "--views", "4", "--view-noise", "0", "--stop-loss", "0",  # every iteration runs
        "--iters", str(ITERS), "--quiet"]


def _iteration(out: Path) -> int:
    """The iteration of the checkpoint on disk (-1: none yet); checkpoint.json is replaced atomically."""
    try:
        return int(json.loads((out / "checkpoint" / "checkpoint.json").read_text())["iteration"])
    except FileNotFoundError:
        return -1


def _signal_when_ready(runs: dict[str, tuple[subprocess.Popen, Path]], timeout: float = 120) -> dict[str, int]:
    """Send each process its signal as soon as its checkpoint reaches iteration 2; return the iteration on disk
    just before the signal."""
    seen, deadline = {}, time.monotonic() + timeout
    while len(seen) < len(runs):
        assert time.monotonic() < deadline, "no checkpoint of iteration 2 within the time limit"
        for sig, (proc, out) in runs.items():
            if sig in seen:
                continue
            if proc.poll() is not None:
                pytest.fail(f"the run ended (status {proc.returncode}) before it could be signalled: "
                            f"{proc.stderr.read()[-2000:]}")
            if _iteration(out) >= 2:
                if sig == "SIGKILL":
                    time.sleep(0.05)  # somewhere inside the next iteration or its checkpoint write
                seen[sig] = _iteration(out)
                proc.send_signal(getattr(signal, sig))
                assert seen[sig] < ITERS - 5, "the run was nearly over when signalled: make ITERS larger"
        time.sleep(0.01)
    return seen


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopped")
    runs = {}
    for sig in ("SIGINT", "SIGKILL"):
        out = root / sig
        proc = subprocess.Popen([sys.executable, "-m", "adjointdpm", *ARGS, "--out", str(out)], env=one_thread_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[sig] = (proc, out)
    try:
        seen = _signal_when_ready(runs)
        results = {}
        for sig, (proc, out) in runs.items():
            _, err = proc.communicate(timeout=120)
            results[sig] = (proc.returncode, err, seen[sig], out)
        return results
    finally:
        for proc, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    torch.set_num_threads(1)  # as the signalled processes (a module fixture runs before the per-test one-thread fixture)
    assert cli_run([*ARGS, "--out", str(out)]) == 0
    return out


def _resume_and_compare(out: Path, reference: Path) -> None:
    assert cli_run([*ARGS, "--out", str(out), "--resume"]) == 0
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b["iterations"] == a["iterations"] == ITERS
    assert [h["loss"] for h in b["loss"]["history"]] == [h["loss"] for h in a["loss"]["history"]]
    assert b["after"] == a["after"] and b["before"] == a["before"] and b["model_calls"] == a["model_calls"]
    x_a, x_b = load_file(str(reference / "latents.safetensors")), load_file(str(out / "latents.safetensors"))
    assert x_a.keys() == x_b.keys() and all(torch.equal(x_a[k], x_b[k]) for k in x_a)
    assert not list((out / "checkpoint").glob(".*tmp*")), "temporary files left behind"


def test_sigint_saves_exits_130_and_resumes_to_the_same_result(stopped, uninterrupted):
    code, err, seen, out = stopped["SIGINT"]
    lines = err.strip().splitlines()
    assert code == 130, err[-2000:]
    assert lines[-1].startswith("adjointdpm: error: interrupted after iteration") and "--resume" in lines[-1]
    assert "Traceback" not in err
    saved = _iteration(out)
    assert seen < saved < ITERS  # the running iteration was finished and saved
    assert f"after iteration {saved}:" in lines[-1]
    assert not (out / "summary.json").exists()
    _resume_and_compare(out, uninterrupted)


def test_sigkill_leaves_a_readable_checkpoint_and_resumes_to_the_same_result(stopped, uninterrupted):
    code, err, seen, out = stopped["SIGKILL"]
    assert code == -signal.SIGKILL, err[-2000:]
    meta, tensors = CheckpointFolder(out).load()  # complete and consistent, whatever the moment of the kill
    saved = int(meta["iteration"])
    assert len(meta["history"]) == saved and tensors["param/x_T/x"].shape == (2, 1, 16, 16)
    # every iteration completed before the kill is on disk but the one it interrupted: at most one interval lost
    assert seen <= saved <= seen + 1 < ITERS
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert [h["loss"] for h in meta["history"]] == [h["loss"] for h in reference["loss"]["history"][:saved]]
    assert not (out / "summary.json").exists()
    _resume_and_compare(out, uninterrupted)
