"""Two processes (torchrun, gloo on loopback) give the single-process result on the same global batch:
data-parallel weight gradients and trained weights, and sharded noise optimisation."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _distributed_worker import fine_tune, optimise_noises
from _helpers import torchrun
from adjointdpm.distributed import DataParallel

HERE = Path(__file__).parent


class _SingleProcess:
    """The DataParallel interface for one process, without an Accelerator."""

    rank, world_size, is_main = 0, 1, True
    shard_bounds = DataParallel.shard_bounds
    shard = DataParallel.shard
    loss_weight = DataParallel.loss_weight
    all_reduce_gradients = DataParallel.all_reduce_gradients
    gather = DataParallel.gather


@pytest.fixture(scope="module")
def two_process_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "rank0.safetensors"
    proc = torchrun(2, [str(HERE / "_distributed_worker.py"), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


def test_data_parallel_fine_tuning_equals_single_process(two_process_result):
    grads, weights = fine_tune(_SingleProcess())
    for name, g in grads.items():
        torch.testing.assert_close(two_process_result[f"grad.{name}"], g, rtol=1e-9, atol=1e-12)
    for name, w in weights.items():
        torch.testing.assert_close(two_process_result[f"weight.{name}"], w, rtol=1e-9, atol=1e-12)
    from conftest import tiny_conditional_unet

    initial = dict(tiny_conditional_unet().named_parameters())
    moved = sum((weights[n] - initial[n]).abs().sum().item() for n in weights)
    assert moved > 1e-6, "the two SGD steps must change the weights for the comparison to mean anything"


def test_sharded_noise_optimisation_equals_single_process(two_process_result):
    torch.testing.assert_close(two_process_result["noises"], optimise_noises(_SingleProcess()), rtol=1e-9, atol=1e-12)


def test_shard_bounds_cover_the_batch():
    class Fake(_SingleProcess):
        pass

    spans = []
    for rank in range(3):
        dp = Fake()
        dp.rank, dp.world_size = rank, 3
        spans.append(dp.shard_bounds(7))
    assert spans == [(0, 2), (2, 4), (4, 7)]
    dp = Fake()
    dp.world_size = 8
    with pytest.raises(ValueError, match="at least one sample per process"):
        dp.shard_bounds(4)
