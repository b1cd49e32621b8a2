"""Worker for tests/test_finetune_distributed.py, run under torchrun: several ``adjointdpm finetune`` command
lines in the same processes (one process-group start for all), each one's exit status and error output recorded
by rank 0 in a JSON file. Usage: ``_finetune_dp_worker.py RESULT.json '[[ARG, ...], ...]'``."""
import contextlib
import io
import json
import os
import sys

import torch

import adjointdpm.distributed as distributed
from adjointdpm.cli import run

if __name__ == "__main__":
    torch.set_num_threads(1)
    dp = distributed.DataParallel(cpu=True)
    assert dp.world_size == 2, dp.world_size
    leave = dp.close
    dp.close = dp.accelerator.wait_for_everyone  # (each command closes its processes; the group serves the next)
    distributed.from_environment = lambda device="cpu": dp
    results = []
    for args in json.loads(sys.argv[2]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = run(args)
        results.append({"code": code, "stderr": err.getvalue()})
        dp.accelerator.wait_for_everyone()
    if dp.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    leave()
    # leave without C++ static destructors (gloo's threads can abort the process then; see _distributed_worker)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
