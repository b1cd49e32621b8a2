"""``adjointdpm finetune`` under ``torchrun --nproc_per_node 2`` (gloo on CPU, float64 weights) trains the LoRA that
one process trains on the same global batch, and its evaluations give the same numbers: ``exact`` on an uneven
split (3 samples: 1 + 2, the gradients weighted 1/3 and 2/3), Adjoint Matching (its outlier percentile over the
global batch) across a checkpoint and ``--resume``. A batch smaller than the number of processes is one line,
exit 2, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import torchrun
from test_tasks_contract import cli

HERE = Path(__file__).parent
COMMON = ["finetune", "--steps", "3", "--eval-seeds", "2", "--dtype", "fp64", "--quiet"]
# (the KL anchor's weight is large so that its term moves the second update: with each process drawing its own ξ
# instead of its rows of the global draw, the two-process update is 3e-2 away from the one-process one)
EXACT = ["--method", "exact:kl=3000", "--batch", "3", "--iters", "2", "--eval-every", "1"]
MATCHING = ["--method", "adjoint-matching", "--batch", "4", "--eval-every", "2", "--checkpoint-every", "1"]
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (two-process out, one-process out)}, and the two-process records (exit status, error output)."""
    root = tmp_path_factory.mktemp("finetune_dp")
    torch.set_num_threads(1)  # as each torchrun process
    prompts = root / "eval.jsonl"  # (three evaluation prompts × two seeds: the evaluations stay cheap)
    prompts.write_text("".join(json.dumps({"prompt": f"a handwritten digit {word}", "class": c}) + "\n"
                               for word, c in (("three", 3), ("eight", 8), ("nine", 9))))
    common = [*COMMON, "--eval-prompts", prompts]
    exact, matching = [*common, *EXACT], [*common, *MATCHING]
    two = {name: root / f"{name}_2" for name in ("exact", "matching", "small")}
    commands = [[*exact, "--out", two["exact"]], [*matching, "--iters", "2", "--out", two["matching"]],
                [*matching, "--iters", "3", "--resume", "--out", two["matching"]],
                [*exact, "--batch", "1", "--out", two["small"]]]
    record = root / "record.json"
    proc = torchrun(2, [str(HERE / "_finetune_dp_worker.py"), str(record),
                        json.dumps([[str(a) for a in c] for c in commands])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(record.read_text())
    one = {"exact": root / "exact_1", "matching": root / "matching_1"}
    for name, args in (("exact", exact), ("matching", [*matching, "--iters", "3"])):
        code, _, err = cli([*args, "--out", one[name]])
        assert code == 0, err
    return {name: (two[name], one[name]) for name in one}, records


def _relative(a: dict, b: dict, keys) -> float:
    fa = torch.cat([a[k].double().flatten() for k in keys])
    fb = torch.cat([b[k].double().flatten() for k in keys])
    return float((fa - fb).norm() / fb.norm())


@pytest.mark.parametrize("name", ["exact", "matching"])
def test_two_processes_train_the_one_process_lora(runs, name):
    (two, one), records = runs[0][name], runs[1]
    assert all(r["code"] == 0 for r in records[:3]), [r["stderr"][-2000:] for r in records[:3]]
    a, b = load_file(str(two / LORA)), load_file(str(one / LORA))
    assert a.keys() == b.keys()
    # LoRA's B matrices start at zero: they are the whole update of theirs. Measured (float64 weights, the
    # rewards in float32 as always): ~1e-6 (exact) and ~4e-7 (Adjoint Matching); without the global
    # percentile Adjoint Matching's is ~8e-4, a wrong weighting of the shards ~1e-1
    trained = sorted(k for k in b if "lora_B" in k)
    assert min(float(b[k].abs().max()) for k in trained) > 1e-3, "the weights must move for the test to mean anything"
    assert _relative(a, b, trained) <= 1e-5
    assert _relative(a, b, sorted(b)) <= 1e-5


@pytest.mark.parametrize("name", ["exact", "matching"])
def test_two_processes_evaluate_and_log_as_one(runs, name):
    two, one = runs[0][name]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert sa["iterations"] == sb["iterations"] and sa["settings"] == sb["settings"]
    # (by iteration: a run resumed after its last iteration has no evaluation at the iteration it stopped at)
    points = {p["iteration"]: p for p in sb["evaluations"]}
    assert {0, sb["iterations"]} <= {p["iteration"] for p in sa["evaluations"]} <= set(points)
    for pa in sa["evaluations"]:
        pb = points[pa["iteration"]]
        assert pa["calls"] == 2 * pb["calls"]  # (network evaluations summed over the two processes)
        for k in ("reward", "judge", "judge_accuracy", "diversity"):
            assert pa[k] == pytest.approx(pb[k], rel=1e-5), k
    for ha, hb in zip(sa["loss"]["history"], sb["loss"]["history"], strict=True):  # the global batch's numbers
        numbers = {k for k in hb if k not in ("seconds", "calls", "method_calls")}
        assert set(ha) == set(hb) and {k: ha[k] for k in numbers} == pytest.approx({k: hb[k] for k in numbers}, rel=1e-5)
    if name == "matching":  # the percentile dropped some entries but not all: it mattered
        assert any(0 < h["method/kept"] < 1 for h in sb["loss"]["history"])
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_a_batch_smaller_than_the_processes_is_one_line(runs):
    record = runs[1][3]
    lines = record["stderr"].strip().splitlines()
    assert record["code"] == 2 and len(lines) == 1 and lines[0].startswith("adjointdpm: error:"), record["stderr"]
    assert "--batch (1) must be at least the number of processes (2)" in lines[0]


def test_a_shard_draws_its_rows_of_the_global_batch_noises():
    """A rollout of rows 1 … 3 of a batch of 4 injects exactly those rows of the global batch's seeded draws
    (what a stochastic sampler and Adjoint Matching use), whatever the seed; one process's rollout the seed itself."""
    from adjointdpm.finetuning import Rollout
    from adjointdpm.finetuning.rollout import GlobalBatchRows
    from adjointdpm.stochastic import SeededNoise

    x = torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    whole = Rollout(network=None, x_T=x, schedule=None, timesteps=None)
    part = Rollout(network=None, x_T=x[1:3], schedule=None, timesteps=None, rows=(1, 3, 4))
    assert whole.seeded_noise(7) == 7
    source = part.seeded_noise(7)
    assert isinstance(source, GlobalBatchRows)
    for step in (0, 5):
        assert torch.equal(source.noise_at(step, x[1:3]), SeededNoise(7).noise_at(step, x)[1:3])
    with pytest.raises(ValueError, match="2 rows was asked for a batch of 3"):
        source.noise_at(0, x[:3])


# ------------------------------------------------------------------------------------------- FSDP2
@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    weights, record = root / "weights.safetensors", root / "record.json"
    proc = torchrun(2, [str(HERE / "_fsdp2_worker.py"), str(weights), str(record)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(weights)), json.loads(record.read_text())


@pytest.mark.parametrize("mode", ["backprop", "exact", "exact_kept", "adjoint_weighted"])
def test_fsdp2_trains_the_one_process_weights_with_every_gradient_mode(fsdp2, mode):
    """FSDP2 (torch's ``fully_shard``) on CPU processes with gloo: plain autograd, the exact adjoint (steps
    recomputed or replayed from kept graphs) and the continuous adjoint (one or two passes per step) reach
    every sharded parameter, and the full weights after two steps are one process's to rounding (float64)."""
    from _fsdp2_worker import MODES, train
    from conftest import tiny_conditional_unet

    sharded, record = fsdp2
    assert record["parameter_type"] == "DTensor" and record["missing"][mode] == [0, 0]
    assert set(record["missing"]) == set(MODES)
    unet = tiny_conditional_unet()
    initial = {n: p.detach().clone() for n, p in unet.named_parameters()}
    train(unet, slice(None), 1.0, mode)
    names = sorted(initial)
    full = torch.cat([p.detach().flatten() for _, p in sorted(unet.named_parameters())])
    two = torch.cat([sharded[f"{mode}.{n}"].flatten() for n in names])
    start = torch.cat([initial[n].flatten() for n in names])
    assert float((full - start).norm() / start.norm()) > 1e-2, "the weights must move for the test to mean anything"
    assert float((two - full).norm() / (full - start).norm()) <= 1e-12  # (measured ~1e-15)


FSDP = ["--lora-rank", "0", "--batch", "2", "--lr", "1e-4"]
MATCHING_FSDP = ["--method", "adjoint-matching", "--eval-every", "2", "--checkpoint-every", "1", "--max-grad-norm", "0.5"]
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """``finetune --method adjoint-matching --lora-rank 0 --fsdp`` on 2 processes, stopped after 1 iteration and
    resumed to 2, and the same 2 iterations without --fsdp on 1 process: (two, one), the two-process records
    (the exact adjoint's gradient under FSDP2 is tested by ``fsdp2`` above)."""
    root = tmp_path_factory.mktemp("finetune_fsdp")
    torch.set_num_threads(1)
    prompts = root / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a handwritten digit {word}", "class": c}) + "\n"
                               for word, c in (("three", 3), ("eight", 8))))
    matching = [*COMMON, "--eval-prompts", prompts, *FSDP, *MATCHING_FSDP]
    two, one = root / "matching_2", root / "matching_1"
    commands = [[*matching, "--fsdp", "--iters", "1", "--out", two],
                [*matching, "--fsdp", "--iters", "2", "--resume", "--out", two],
                [*matching, "--fsdp", "--batch", "3", "--out", root / "uneven"]]
    record = root / "record.json"
    proc = torchrun(2, [str(HERE / "_finetune_dp_worker.py"), str(record),
                        json.dumps([[str(a) for a in c] for c in commands])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, _, err = cli([*matching, "--iters", "2", "--out", one])
    assert code == 0, err
    return (two, one), json.loads(record.read_text())


def test_fsdp_finetune_trains_the_one_process_full_weights(fsdp_runs):
    """The weights sharded over 2 processes (FSDP2 on gloo), Adjoint Matching (its frozen base copy taken before
    sharding, --max-grad-norm clipping the sharded gradient) across a checkpoint of the shards and their AdamW
    state and ``--resume``: the full weights written, the losses and gradient norms are one process's."""
    from adjointdpm.components import EMBEDDED_MODEL, load_components

    (two, one), records = fsdp_runs
    assert all(r["code"] == 0 for r in records[:2]), [r["stderr"][-2000:] for r in records[:2]]
    a, b = load_file(str(two / UNET)), load_file(str(one / UNET))
    start = {k: v.double() for k, v in load_components(EMBEDDED_MODEL).unet.state_dict().items()}
    assert a.keys() == b.keys() == start.keys()
    keys = sorted(b)
    update = torch.cat([(b[k] - start[k]).flatten() for k in keys])
    difference = torch.cat([(a[k] - b[k]).flatten() for k in keys])
    assert float(update.norm()) > 1e-3, "the weights must move for the test to mean anything"
    # AdamW's first steps are nearly sign(gradient): an element whose gradient is ~0 may step the other way on
    # the float32 rewards' rounding (measured over 3 iterations: 1 element of 1.06 million by 1.6e-4 = 1.6 lr);
    # the rest agree to a few 1e-6 of the update (measured over these 2 iterations: 1.0e-5 with none set aside,
    # 3.3e-6 without the 10 largest; the losses to 8e-8, the gradient norms to 1.4e-7)
    ranked = difference.abs().sort().values
    assert float(ranked[-1]) <= 3 * 1e-4 * iterations_of(two)
    assert float(ranked[:-10].norm() / update.norm()) <= 1e-4
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert sa["iterations"] == sb["iterations"] == 2
    for ha, hb in zip(sa["loss"]["history"], sb["loss"]["history"], strict=True):
        assert (ha["loss"], ha["grad_norm"]) == pytest.approx((hb["loss"], hb["grad_norm"]), rel=1e-5)


def iterations_of(out: Path) -> int:
    return json.loads((out / "summary.json").read_text())["iterations"]


def test_fsdp_needs_equal_shards(fsdp_runs):
    record = fsdp_runs[1][2]
    lines = record["stderr"].strip().splitlines()
    assert record["code"] == 2 and len(lines) == 1, record["stderr"]
    assert "--fsdp needs --batch (3) to be a multiple of the number of processes (2)" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--fsdp"], "--fsdp shards all the weights: use it with --lora-rank 0"),
    (["--fsdp", "--lora-rank", "0"], "--fsdp shards the weights over the processes of a launch"),
])
def test_fsdp_misuse_is_one_line(tmp_path, args, message):
    code, _, err = cli([*COMMON, "--iters", "1", *args, "--out", tmp_path / "out"])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_finetune_refuses_accelerates_fsdp_configuration():
    """An ``accelerate launch`` with an FSDP configuration expects accelerate to wrap the model; finetune shards
    it itself (--fsdp) and says so in one line."""
    from types import SimpleNamespace

    from adjointdpm.apps.errors import UserInputError
    from adjointdpm.apps.finetune import FinetuneTask, Options
    from adjointdpm.distributed import DataParallel

    dp = DataParallel(accelerator=SimpleNamespace(distributed_type="DistributedType.FSDP", num_processes=2,
                                                  process_index=0, is_main_process=True))
    assert dp.shards_weights
    with pytest.raises(UserInputError, match="not through accelerate's FSDP configuration"):
        FinetuneTask(SimpleNamespace(dp=dp), Options(), None, None, None, [], [])
