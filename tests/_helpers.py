"""Helpers shared by several test modules (no tests here)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


class PoisonGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite value whose gradient is NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env(**extra) -> dict:
    """The environment of a child process: one torch thread, this test folder importable."""
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def torchrun(nproc: int, target: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc TARGET…`` on loopback (gloo on CPU); ``target`` is a script path and
    its arguments, or ``["-m", module, …]``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
    return subprocess.run(cmd, env=one_thread_env(MASTER_ADDR="127.0.0.1"), capture_output=True, text=True,
                          timeout=timeout)
