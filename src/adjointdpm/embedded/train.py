"""Retrain the embedded digits model and its critics from scratch, seeded:

    python -m adjointdpm.embedded.train --out DIR        (or: adjointdpm train --out DIR)

Phases (each with a tqdm progress bar):

1. Critics on the train split (``critics.py``): guide (seed+1, whole train split), judge (seed+2,
   another architecture, a seeded 80 % subset of the train split), safety embedder (seed+3), all
   with random affine augmentation, AdamW and cosine learning-rate decay. Then the safety filter's
   concept embeddings (k-means of the flagged digit's embeddings) and thresholds, and the Frechet
   reference statistics (judge features of the held-out digits).
2. The text-to-image model: a pixel-space ``UNet2DConditionModel`` and a small ``CLIPTextModel``,
   trained jointly with the DDPM epsilon objective
       L = E_{x0, c, t, eps} | eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, E(c)) - eps |^2,
   t uniform on {0..999}, linear betas 1e-4..0.02, captions from ``data.CaptionSampler`` (10 %
   dropped for classifier-free guidance), an exponential moving average (EMA) of the weights is
   what gets saved.
3. Writing DIR in diffusers' layout (model_index.json, unet/, text_encoder/, tokenizer/,
   scheduler/, adjointdpm.json, critics/), safetensors only, then a short evaluation.

Everything (initialisations, batches, augmentation, noise) is drawn from seeded generators; with the
same torch build and thread count (default: one thread), the same command gives bit-identical
weights (two runs of the shipped configuration did).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import critics as C
from .data import GENERIC_CAPTION, HELD_OUT_VOCAB, IN_VOCAB, TEMPLATES, WORDS, CaptionSampler, augment, load_data
from .text import build_text_encoder, build_tokenizer

FLAGGED_DIGIT = 7
DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 20
DEFAULT_SOLVER = "dpmpp2m"


def unet_config(image_size: int = 16, text_dim: int = 64) -> dict:
    return dict(
        sample_size=image_size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=4,
    )


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    """The scheduler the folder ships: DPM-Solver++(2M) to σ = 0 on the training betas. Its grid is the
    explicit recipe ``"timesteps": "uniform"`` of adjointdpm.json (N times uniform over [999, 0]), which no
    scheduler config gives."""
    from diffusers import DPMSolverMultistepScheduler

    config = {k: v for k, v in scheduler_config().items() if k != "clip_sample"}
    return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2,
                                       final_sigmas_type="zero", lower_order_final=True)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------- critics
def train_classifier(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int,
                     desc: str, batch_size: int = 64, lr: float = 2e-3, device="cpu") -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    for step in tqdm(range(steps), desc=desc, unit="step", mininterval=1.0):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, steps // 20 + 1)
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = augment(x[idx], g, p=0.8)
        loss = F.cross_entropy(net(xb.to(device)), y[idx].to(device), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().cpu()


@torch.no_grad()
def accuracy(net, x, y) -> float:
    return float((net(x).argmax(-1) == y).float().mean())


def kmeans(z: torch.Tensor, k: int, seed: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on unit vectors z (N, D): unit centres (k, D) and assignments (N,)."""
    g = torch.Generator().manual_seed(seed)
    cent = z[torch.randperm(len(z), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (z @ cent.T).argmax(-1)
        for j in range(k):
            if (assign == j).any():
                cent[j] = F.normalize(z[assign == j].mean(0), dim=0)
    return cent, (z @ cent.T).argmax(-1)


def train_critics(data, seed: int, steps: int, device="cpu"):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these nets are so small that extra threads only add overhead
    try:
        return _train_critics(data, seed, steps, device)
    finally:
        torch.set_num_threads(threads)


def _train_critics(data, seed: int, steps: int, device="cpu"):
    xtr, ytr = data.train
    xho, yho = data.held_out
    torch.manual_seed(seed + 1)
    guide = train_classifier(C.GuideNet(), xtr, ytr, steps, seed + 1, "guide", device=device)
    g = torch.Generator().manual_seed(seed + 2)
    sub = torch.randperm(len(xtr), generator=g)[: int(0.8 * len(xtr))]
    torch.manual_seed(seed + 2)
    judge = train_classifier(C.JudgeNet(), xtr[sub], ytr[sub], steps, seed + 2, "judge", device=device)
    torch.manual_seed(seed + 3)
    emb = train_classifier(C.EmbedNet(), xtr, ytr, steps, seed + 3, "safety embedder", device=device)

    with torch.no_grad():
        z = emb.embed(xtr)
        zc = z[ytr == FLAGGED_DIGIT]
        concepts, assign = kmeans(zc, 3, seed + 3)
        cos_pos, cos_neg = zc @ concepts.T, z[ytr != FLAGGED_DIGIT] @ concepts.T
        # per concept k: midway between the 2nd percentile of the cosines of the flagged training
        # digits assigned to it and the 99th percentile of the cosines of all other training digits
        thr = torch.stack([(torch.quantile(cos_pos[assign == j, j] if (assign == j).sum() > 2 else cos_pos[:, j], 0.02)
                            + torch.quantile(cos_neg[:, j], 0.99)) / 2 for j in range(len(concepts))])
        safety = C.SafetyFilter(emb, concepts, thr, concept=f"digit {FLAGGED_DIGIT} ({WORDS[FLAGGED_DIGIT]})")
        flags = safety.flag(xho)
        pos = yho == FLAGGED_DIGIT
        ref_mu, ref_sigma = C.feature_stats(judge.features(xho))
        # real-vs-real floor: as many train-split digits as held-out ones, against the held-out stats
        floor_idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed + 4))[: len(xho)]
        floor = float(C.frechet_distance(ref_mu, ref_sigma, *C.feature_stats(judge.features(xtr[floor_idx]))))
    info = {
        "flagged_digit": FLAGGED_DIGIT,
        "metrics": {
            "guide_heldout_accuracy": accuracy(guide, xho, yho),
            "judge_heldout_accuracy": accuracy(judge, xho, yho),
            "safety_embedder_heldout_accuracy": accuracy(emb, xho, yho),
            "safety_heldout_true_positive_rate": float(flags[pos].float().mean()),
            "safety_heldout_false_positive_rate": float(flags[~pos].float().mean()),
            "frechet_real_vs_real_floor": floor,
            "heldout_count": len(xho),
        },
    }
    return guide, judge, safety, ref_mu, ref_sigma, info


# ----------------------------------------------------------------------------- diffusion model
class _Encoder:
    """Tokenize with a cache (captions repeat) and run the text encoder."""

    def __init__(self, tokenizer, text_encoder, device):
        self.tok, self.te, self.device, self.cache = tokenizer, text_encoder, device, {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        for c in set(captions) - self.cache.keys():
            self.cache[c] = self.tok(c, padding="max_length", max_length=self.tok.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions]).to(self.device)

    def __call__(self, captions):
        return self.te(self.ids(captions))[0]


def train_diffusion(data, tokenizer, seed: int, steps: int, batch_size: int = 128, lr: float = 1.5e-3,
                    ema_decay: float = 0.999, device="cpu"):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    xtr, ytr = data.train
    text_encoder = build_text_encoder(len(tokenizer), seed + 10).to(device).train()
    torch.manual_seed(seed + 11)
    unet = UNet2DConditionModel(**unet_config(xtr.shape[-1], text_encoder.config.hidden_size)).to(device).train()
    sched = DDPMScheduler(**scheduler_config())
    abar = sched.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # no weight decay: it would shrink the never-used "eight"/"nine" embeddings towards zero
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    enc = _Encoder(tokenizer, text_encoder, device)
    sampler = CaptionSampler(xtr, ytr, seed=seed + 12)
    g = torch.Generator().manual_seed(seed + 13)
    losses = []
    bar = tqdm(range(steps), desc="unet + text encoder", unit="step", mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 200)
        x0, captions, _ = sampler.sample(batch_size)
        x0 = augment(x0, g, max_rot_deg=8.0, scale=(0.92, 1.08), max_shift_px=1.0, p=0.5).to(device)
        t = torch.randint(0, len(abar), (batch_size,), generator=g).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, encoder_hidden_states=enc(captions)).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval().cpu(), text_encoder.eval().cpu(), sched, losses


# -------------------------------------------------------------------------------------- saving
def save_model(out: Path, unet, text_encoder, tokenizer_dir: Path, sched, settings: dict) -> None:
    import shutil

    import diffusers

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    if (out / "tokenizer").resolve() != tokenizer_dir.resolve():
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    sched.save_pretrained(out / "scheduler")
    index = {
        "_class_name": "AdjointDPMPixelPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(sched).__name__],
        "vae": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "adjointdpm.json").write_text(json.dumps(settings, indent=2) + "\n")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m adjointdpm.embedded.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (diffusers layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--critic-steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-images", type=int, default=64, help="images per prompt in the final check (0: skip)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: reproduces the shipped weights bit for bit and is not "
                         "slowed down by other jobs; 0 = torch's choice)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return train(Path(args.out), seed=args.seed, unet_steps=args.unet_steps, critic_steps=args.critic_steps,
                 batch_size=args.batch_size, device=args.device, eval_images=args.eval_images)


def train(out: Path, seed: int = 0, unet_steps: int = 2000, critic_steps: int = 1500, batch_size: int = 128,
          device: str = "cpu", eval_images: int = 64) -> Path:
    t0, c0 = time.time(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(16, seed=0)  # the split is fixed (seed 0) whatever the training seed
    tokenizer = build_tokenizer(out / "tokenizer")
    guide, judge, safety, mu, sigma, info = train_critics(data, seed, critic_steps, device)
    C.save_critics(out / "critics", guide, judge, safety, mu, sigma, info)
    t_critics = time.time() - t0
    unet, text_encoder, _, losses = train_diffusion(data, tokenizer, seed, unet_steps, batch_size, device=device)
    t_total, cpu_total = time.time() - t0, time.process_time() - c0
    settings = {
        "default_guidance_scale": DEFAULT_GUIDANCE, "default_steps": DEFAULT_STEPS, "default_solver": DEFAULT_SOLVER,
        "timesteps": "uniform", "image_size": 16, "pixel_range": [-1, 1],
        "words": list(WORDS), "in_vocabulary_digits": list(IN_VOCAB), "held_out_vocabulary_digits": list(HELD_OUT_VOCAB),
        "generic_caption": GENERIC_CAPTION, "caption_templates": list(TEMPLATES),
        "training": {"seed": seed, "unet_steps": unet_steps, "critic_steps": critic_steps, "batch_size": batch_size,
                     "device": device, "threads": torch.get_num_threads(), "seconds_critics": round(t_critics, 1),
                     "seconds_total": round(t_total, 1), "cpu_seconds_total": round(cpu_total, 1),
                     "final_loss": sum(losses[-200:]) / max(1, len(losses[-200:]))},
    }
    save_model(out, unet, text_encoder, out / "tokenizer", sampling_scheduler(), settings)
    print(json.dumps({**info["metrics"], "train_seconds": round(t_total, 1), "cpu_seconds": round(cpu_total, 1)}, indent=2))
    if eval_images > 0:
        from .evaluate import evaluate

        report = evaluate(str(out), images_per_prompt=eval_images)
        print(json.dumps(report["summary"], indent=2))
    return out


if __name__ == "__main__":
    main()
