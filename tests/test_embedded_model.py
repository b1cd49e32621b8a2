"""Quality bars of the shipped embedded digits model and its critics, on the shipped weights.

Generation: 20 dpmpp2m steps, the model's default guidance scale, seed 0; the independent judge
classifies every image. ~80 CPU-seconds for the 840 generated images.
"""
from __future__ import annotations

import pytest
import torch

from adjointdpm.components import EMBEDDED_MODEL, load_components
from adjointdpm.embedded.critics import load_critics
from adjointdpm.embedded.critics import feature_stats, frechet_distance
from adjointdpm.embedded.data import (GENERIC_CAPTION, HELD_OUT_VOCAB, IN_VOCAB, CaptionSampler, load_data,
                                      prompt_for)

N = 64  # images per digit prompt
N_GENERIC = 200


@pytest.fixture(scope="module")
def critics():
    return load_critics()


@pytest.fixture(scope="module")
def data():
    return load_data()


def test_generated_digits_meet_the_quality_bars(critics, data):
    """All bars that need generated images, in ONE test so that pytest-xdist generates them once."""
    comps = load_components()
    digits = IN_VOCAB + HELD_OUT_VOCAB
    prompts = [prompt_for(d) for d in digits for _ in range(N)] + [GENERIC_CAPTION] * N_GENERIC
    raw = comps.generate(prompts, seed=0, steps=20, solver="dpmpp2m")  # default guidance
    assert torch.isfinite(raw).all()
    images = raw.clamp(-1, 1)  # as written to PNG
    with torch.no_grad():
        pred = critics.judge(images).argmax(-1)
        flags = critics.safety.flag(images)
    n_p = len(digits) * N
    rate = {d: (pred[k * N:(k + 1) * N] == d).float().mean().item() for k, d in enumerate(digits)}
    flag_rate = {d: flags[k * N:(k + 1) * N].float().mean().item() for k, d in enumerate(digits)}
    generic = torch.bincount(pred[n_p:], minlength=10).float() / N_GENERIC
    fd = frechet_distance(critics.frechet.mu, critics.frechet.sigma,
                          *feature_stats(critics.judge.features(images[n_p:]))).item()
    floor = critics.config["metrics"]["frechet_real_vs_real_floor"]
    flagged = critics.config["flagged_digit"]

    failures = []
    for d in IN_VOCAB:
        if rate[d] < 0.9:
            failures.append(f"'{prompt_for(d)}': judge says {d} for {rate[d]:.1%} of {N} images (bar 90 %)")
    for d in HELD_OUT_VOCAB:
        if rate[d] > 0.3:
            failures.append(f"'{prompt_for(d)}' (word never in training) gives {d} for {rate[d]:.1%} (bar <= 30 %)")
    if generic.min().item() < 0.03:
        failures.append(f"generic prompt class rates {[round(v, 3) for v in generic.tolist()]} (bar: all >= 3 %)")
    if not 0 < floor < fd < 10 * floor + 5.0:
        failures.append(f"Frechet distance {fd:.2f} not in (real floor {floor:.2f}, 10 x floor + 5)")
    if abs(images.mean().item() - data.held_out[0].mean().item()) > 0.1:
        failures.append("mean pixel (ink / background balance) differs from real digits by > 0.1")
    if flag_rate[flagged] < 0.8 or max(v for d, v in flag_rate.items() if d != flagged) > 0.15:
        failures.append(f"safety filter flag rates per prompt {flag_rate} (want >= 80 % for {flagged}, <= 15 % else)")
    assert not failures, "\n".join(failures)


def test_critics_on_held_out_real_digits(critics, data):
    x, y = data.held_out
    with torch.no_grad():
        judge = (critics.judge(x).argmax(-1) == y).float().mean().item()
        guide = (critics.guide(x).argmax(-1) == y).float().mean().item()
        flags = critics.safety.flag(x)
    assert judge >= 0.97 and guide >= 0.96
    digit = critics.config["flagged_digit"]
    assert flags[y == digit].float().mean() >= 0.85  # true positives
    assert flags[y != digit].float().mean() <= 0.05  # false positives


def test_critics_are_differentiable(critics, data):
    x = data.held_out[0][:8].clone().requires_grad_(True)
    loss = critics.guide(x).logsumexp(-1).sum() + critics.safety(x).sum() + critics.frechet(x)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # colour and size are adapted differentiably (e.g. a 3-channel 32x32 decoder output)
    y = torch.zeros(2, 3, 32, 32, requires_grad=True)
    critics.judge(y).sum().backward()
    assert y.grad.shape == y.shape and y.grad.abs().sum() > 0


def test_frechet_distance_matches_closed_form():
    # 1-D Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2
    d = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[9.0]]))
    assert abs(d.item() - (4.0 + 1.0)) < 1e-9
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s = a @ a.T + torch.eye(5, dtype=torch.float64)
    mu = torch.randn(5, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(mu, s, mu, s).item()) < 1e-8


def test_data_split_and_vocabulary_gap(data):
    tr, ho = data.train_idx, data.held_idx
    assert len(set(tr.tolist()) & set(ho.tolist())) == 0 and len(tr) + len(ho) == 1797
    assert torch.equal(load_data().held_idx, ho)  # fixed split
    counts = torch.bincount(data.labels[ho], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # stratified 20 %
    assert data.images.shape[1:] == (1, 16, 16) and data.images.min() >= -1 and data.images.max() <= 1
    sampler = CaptionSampler(*data.train, seed=0)
    _, captions, labels = sampler.sample(4000)
    words = " ".join(captions).split()
    assert "eight" not in words and "nine" not in words
    for cap, lab in zip(captions, labels.tolist()):
        if lab in HELD_OUT_VOCAB:
            assert cap in ("", GENERIC_CAPTION)
    assert 0.07 < captions.count("") / len(captions) < 0.13


def test_assets_are_small_and_safetensors_only():
    files = [p for p in EMBEDDED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler", "critics"):
        assert (EMBEDDED_MODEL / sub).is_dir()


def test_unseen_words_keep_their_initial_embedding():
    from adjointdpm.embedded.text import build_text_encoder

    comps = load_components()
    seed = comps.settings["training"]["seed"]
    init = build_text_encoder(len(comps.tokenizer), seed=seed + 10).get_input_embeddings().weight
    trained = comps.text_encoder.get_input_embeddings().weight
    ids = comps.tokenizer.convert_tokens_to_ids
    for word in ("eight", "nine"):
        assert torch.equal(trained[ids(word + "</w>")], init[ids(word + "</w>")])
    assert not torch.equal(trained[ids("seven</w>")], init[ids("seven</w>")])
