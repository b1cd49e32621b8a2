"""Fresh processes for the benchmark's measurements, without paying torch's import for each.

``Zygote(jobs="package.module")`` starts one helper interpreter (``python -m adjointdpm.bench.zygote``)
that imports torch, diffusers, the engine and the module holding the job table (``JOBS``: name → function
of a job dict) once and then, for every job, ``fork()``s a child that runs ``JOBS[job["job"]](job)`` and
exits. The job module is named, never imported here, so the suites import this module and not the reverse.
Each child is a new process whose only history is those imports: no tensor was ever allocated, no
autograd graph built, no thread pool started (the helper never computes), so its peak RSS belongs to the
job alone. The job's result comes back as JSON through a file; a child killed by the kernel (out of
memory) or by the timeout is reported as such.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PRELOAD = ("torch", "diffusers", "diffusers.models.unets.unet_2d_condition", "adjointdpm")


class Zygote:
    """Context manager: ``run(job, timeout)`` runs ``JOBS[job["job"]](job)`` of the module ``jobs`` in a
    freshly forked child and returns its result dict (or ``{"error": …}``)."""

    def __init__(self, jobs: str):
        self.jobs = jobs

    def __enter__(self) -> "Zygote":
        self._dir = tempfile.TemporaryDirectory(prefix="adjointdpm-zygote-")
        self._proc = subprocess.Popen([sys.executable, "-m", "adjointdpm.bench.zygote", self.jobs],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._count = 0
        return self

    def run(self, job: dict, timeout: float) -> dict:
        self._count += 1
        path = Path(self._dir.name) / f"result-{self._count}.json"
        self._proc.stdin.write(json.dumps({"job": job, "path": str(path), "timeout": timeout}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's helper process died (see the messages above)")
        status = json.loads(line)
        if path.exists():
            result = json.loads(path.read_text())
            path.unlink()
            return result
        if status.get("timeout"):
            return {"error": f"timed out after {timeout:.0f} s"}
        code = status.get("exitcode")
        return {"error": "killed by the kernel (out of memory?)" if code == -signal.SIGKILL else
                f"worker exited with {code}"}

    def __exit__(self, *exc) -> None:
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
        self._dir.cleanup()


def _child(request: dict, jobs: dict) -> None:
    """In the forked child: run the job, write the result, exit without running any atexit handler."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stdout is the helper's channel to the orchestrator: keep it clean
    code = 0
    try:
        import warnings

        import torch

        warnings.filterwarnings("ignore")
        job = request["job"]
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        result = jobs[job["job"]](job)
    except BaseException as exc:  # reported to the orchestrator, which goes on with the next job
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        code = 1
    try:
        tmp = request["path"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        os.replace(tmp, request["path"])
    finally:
        os._exit(code)


def serve(jobs_module: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    jobs = importlib.import_module(jobs_module).JOBS
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, jobs)
        deadline = time.monotonic() + float(request["timeout"])
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.01)
        sys.stdout.write(json.dumps({"exitcode": os.waitstatus_to_exitcode(status), "timeout": timed_out}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
