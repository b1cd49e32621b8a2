"""The retraining entry point runs end to end (a few steps), writes a loadable folder, and is seeded."""
from __future__ import annotations

import json

import torch

from adjointdpm.cli import run
from adjointdpm.components import load_components
from adjointdpm.embedded.critics import load_critics
from adjointdpm.embedded.data import load_data
from adjointdpm.embedded.text import build_tokenizer
from adjointdpm.embedded.train import train_diffusion


def test_train_command_writes_a_loadable_model(tmp_path):
    out = tmp_path / "model"
    assert run(["train", "--out", str(out), "--unet-steps", "2", "--critic-steps", "2", "--eval-images", "0"]) == 0
    settings = json.loads((out / "adjointdpm.json").read_text())
    assert settings["training"]["unet_steps"] == 2 and settings["default_solver"] == "dpmpp2m"
    comps = load_components(out)
    assert comps.latent_shape == (1, 16, 16) and comps.vae is None
    critics = load_critics(out)
    img = comps.generate(["a handwritten digit one"], steps=2)
    assert critics.judge(img).shape == (1, 10)
    assert {p.suffix for p in out.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".txt"}


def test_diffusion_training_is_seeded(tmp_path):
    data = load_data()
    tok = build_tokenizer(tmp_path / "tok")
    runs = [train_diffusion(data, tok, seed=s, steps=2, batch_size=8) for s in (0, 0, 1)]
    (u1, t1, _, l1), (u2, t2, _, l2), (u3, _, _, l3) = runs
    assert l1 == l2 and l1 != l3
    for a, b in zip(u1.state_dict().values(), u2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(t1.get_input_embeddings().weight, t2.get_input_embeddings().weight)
