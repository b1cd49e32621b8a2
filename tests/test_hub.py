"""Hugging Face ids for models and critics, through a Hub cache the test builds, and single-file checkpoints.

The cache is huggingface_hub's layout, made by hand in tmp_path: ``models--org--name/snapshots/<commit>/``
holding the folder and ``refs/main`` (and a tag) naming the commit. With ``HF_HUB_CACHE`` pointing there
and ``HF_HUB_OFFLINE=1``, ``load_components("org/name")`` (and ``@tag`` / ``@commit``), ``adjointdpm sample
--model org/name`` and a critic id open the cached snapshot; an id absent from the cache is one error line
naming HF_HUB_OFFLINE and how to download it. No network is used: offline throughout, and the online
branch is checked with huggingface_hub's functions replaced.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from adjointdpm import hub
from adjointdpm.components import ComponentsError, load_components
from adjointdpm.critics import CriticError, folder_kind

from _tiny_critics import build_classifier
from _tiny_families import build_tiny_flux
from _tiny_sd import build_tiny_sd

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, tags: tuple[str, ...] = ()) -> Path:
    """Put ``folder`` into the Hub cache ``cache`` as ``repo_id``'s snapshot at ``commit`` (refs/main + tags)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snap = storage / "snapshots" / commit
    shutil.copytree(folder, snap)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in ("main", *tags):
        (storage / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("hub") / "sd")


def test_hub_ids_are_told_from_paths():
    assert hub.parse_hub_id("acme/tiny-sd") == ("acme/tiny-sd", None)
    assert hub.parse_hub_id("acme/tiny.sd_1@v1.0") == ("acme/tiny.sd_1", "v1.0")
    assert hub.parse_hub_id(f"acme/x@{COMMIT}") == ("acme/x", COMMIT)
    for path in ("/abs/folder", "./rel/folder", "a/b/c", "name", "../up/x", "acme/"):
        assert hub.parse_hub_id(path) is None, path


def test_a_model_id_loads_from_the_cache_offline(offline_cache, sd_folder):
    snap = cache_model(offline_cache, "acme/tiny-sd", sd_folder, tags=("v1",))
    local = load_components(sd_folder)
    for spec in ("acme/tiny-sd", "acme/tiny-sd@v1", f"acme/tiny-sd@{COMMIT}"):
        comps = load_components(spec)
        assert comps.path == snap and comps.family == "sd"
        for a, b in zip(comps.unet.parameters(), local.unet.parameters()):
            assert torch.equal(a, b)
    torch.testing.assert_close(comps.generate(["a small digit"], seed=0, steps=2),
                               local.generate(["a small digit"], seed=0, steps=2), rtol=0, atol=0)


def test_an_id_missing_from_the_cache_is_one_line(offline_cache, sd_folder):
    cache_model(offline_cache, "acme/tiny-sd", sd_folder)
    for spec, needle in (("acme/absent", "hf download acme/absent"), ("acme/tiny-sd@v9", "--revision v9")):
        with pytest.raises(ComponentsError) as err:
            load_components(spec)
        message = str(err.value)
        assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and needle in message, message
        assert str(offline_cache) in message
    with pytest.raises(ComponentsError, match="does not exist .give a local path or a Hugging Face id"):
        load_components(offline_cache / "no-such-folder")


def test_sample_command_takes_an_id(offline_cache, sd_folder, tmp_path):
    from adjointdpm.cli import run

    cache_model(offline_cache, "acme/tiny-sd", sd_folder)
    out = tmp_path / "out"
    assert run(["sample", "-p", "a small digit", "-n", "1", "--steps", "2", "--model", "acme/tiny-sd", "-o",
                str(out), "--dtype", "fp32"]) == 0
    assert (out / "000.png").is_file()


def test_a_critic_id_loads_from_the_cache_offline(offline_cache, tmp_path):
    from adjointdpm.critics.classifier import Classifier

    snap = cache_model(offline_cache, "acme/tiny-classifier", build_classifier(tmp_path / "clf"))
    assert folder_kind("acme/tiny-classifier", "--classifier") == "classifier"
    critic = Classifier.from_folder("acme/tiny-classifier")
    assert Path(critic.path) == snap and critic.num_classes == 3
    with pytest.raises(CriticError, match=r"--judge acme/nope is no local path, nor in the Hugging Face cache .*HF_HUB_OFFLINE=1"):
        folder_kind("acme/nope", "--judge")


def test_online_fetches_configs_and_one_set_of_weights(monkeypatch, tmp_path):
    files = ["model_index.json", "sd_xl_base_1.0.safetensors", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
             "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors", "tokenizer/merges.txt",
             "text_encoder_2/model.safetensors.index.fp16.json", "text_encoder_2/model-00001-of-00002.fp16.safetensors",
             "text_encoder_2/model-00002-of-00002.fp16.safetensors"]
    assert hub.weight_files(files) == ["text_encoder_2/model-00001-of-00002.fp16.safetensors",
                                       "text_encoder_2/model-00002-of-00002.fp16.safetensors",
                                       "text_encoder_2/model.safetensors.index.fp16.json",
                                       "unet/diffusion_pytorch_model.safetensors",
                                       "vae/diffusion_pytorch_model.fp16.safetensors"]
    calls = {}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.update(repo_id=repo_id, **kwargs)
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "_repo_files", lambda repo_id, revision: files)
    assert hub.resolve("acme/sdxl@main") == tmp_path
    assert calls["repo_id"] == "acme/sdxl" and calls["revision"] == "main" and not calls["local_files_only"]
    assert calls["cache_dir"] == tmp_path / "cache" and calls["ignore_patterns"] is None
    assert "unet/diffusion_pytorch_model.safetensors" in calls["allow_patterns"]
    assert not any(p.endswith((".bin", "sd_xl_base_1.0.safetensors")) for p in calls["allow_patterns"])


def test_single_file_network_checkpoint(tmp_path):
    from safetensors.torch import save_file

    folder = build_tiny_flux(tmp_path / "flux")
    base = load_components(folder)
    tuned = {k: v + 0.01 for k, v in base.network.state_dict().items()}
    file = tmp_path / "flux-tuned.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.items()}, file)
    configs = tmp_path / "flux-configs"  # the network's weights are not needed beside the single file
    shutil.copytree(folder, configs)
    for weights in (configs / "transformer").glob("*.safetensors"):
        weights.unlink()
    comps = load_components(file, config=configs, dtype="bf16")
    got = comps.network.state_dict()
    assert all(torch.equal(got[k], tuned[k].to(torch.bfloat16)) for k in tuned)
    assert comps.text_encoder_2.dtype == torch.bfloat16 and comps.path == configs
    assert comps.load_options["single_file"] == file
    with pytest.raises(ComponentsError, match="single-file checkpoint: give the diffusers folder"):
        load_components(file)
    with pytest.raises(ComponentsError, match="config= is for a single-file checkpoint"):
        load_components(folder, config=folder)
    pickled = tmp_path / "flux.ckpt"
    pickled.write_bytes(b"not opened")
    with pytest.raises(ComponentsError, match=r"^\S+flux.ckpt is a pickle checkpoint \(.ckpt\), which is never loaded"):
        load_components(pickled, config=folder)
