"""``finetune``: reward fine-tuning of a model's weights (LoRA or all) over a distribution of prompts.

Each iteration draws ``--batch`` prompts (uniformly, with replacement, from the training prompts) and as many
fresh noises x_T from the loop's per-iteration generator, builds a :class:`~adjointdpm.finetuning.Rollout`
from the session (its network, schedule, grid, guidance, solver, the prompts' conditioning) and lets the
fine-tuning method add ∇θ of its loss to the weights' ``.grad`` (:mod:`adjointdpm.finetuning`: ``exact``,
``truncated:k=K`` (DRaFT-K), ``alignprop``, ``onestep`` (ReFL), ``adjoint``, ``adjoint-matching``); the
method back-propagates itself, so the loss handed to the loop carries no graph. The reward is the weighted sum
R = Σ w_i r_i of ``--reward`` (maximised) on the decoded images, their prompts and the prompts' fields.

Evaluation, before training, every ``--eval-every`` iterations and after: the evaluation prompts × the same
``--eval-seeds`` noises (seed j's x_T is ``comps.noise(S, seed + 104729)[j]`` for every prompt, what
``adjointdpm sample -n S --seed SEED+104729`` draws): the mean optimised reward (and each term), the
judge's reward (``--judge-reward``, never optimised), its accuracy where the judge has one, the diversity
per prompt (mean pairwise distance of the judge's features) — per prompt and averaged. The curves of the
optimised and the judge's reward against the training model calls and seconds go to ``curves.png``;
``prompts/NN.png`` is prompt NN's before row above its after row. When the optimised reward has risen since
the judge's best evaluation while the judge's reward has fallen, the reward-hacking alarm is printed and
recorded in summary.json (``hacking_alarm``: the last ring, ``hacking_alarms``: every one with its iteration).

Every evaluation image is also checked against the base model's manifold (:mod:`.manifold`): its denoising
error under the *base* model (the LoRA switched off, or the weights as they were before training) as a
z-score against the before-images (the base model's own samples of the evaluation prompts and seeds: the
calibration costs no extra sampling); z > 6 flags it. Each evaluation records ``flagged`` and
``flagged_fraction``; the before/after metrics hold every image's ``manifold_z``, the flagged indices
(``off_manifold_images``) and the count per prompt; comparison.png captions each image with its z ("OFF" when
flagged). Cost: 3 network calls per image per evaluation (no guidance, no backward), and with ``--lora-rank 0``
a copy of the weights in host memory.

Defaults that depend on the model: the prompts (the digits model's ten digit prompts on the embedded model,
DDPO's 45 simple animals otherwise), the reward and the judge (the digits model's guide classifier and its
independent judge where the model ships them, else ``--reward`` is required); and on the method: the learning
rate and, for Adjoint Matching, its reward scale λ (:data:`METHOD_RECIPES`).

Several processes (``torchrun`` / ``accelerate launch``): data parallel. Every process draws the same global
batch (prompts and x_T from the same iteration generator, as one process does) and samples its rows of it; the
noises a method injects are the global batch's rows too (:meth:`~adjointdpm.finetuning.Rollout.seeded_noise`).
Its gradient, of its shard's mean loss, is weighted by its share B_p / B of the batch and the loop sums the
gradients over the processes: the gradient of the global batch's mean loss, clipped after the sum. Adjoint
Matching's outlier percentile is taken over the global batch (its ``gather``); the logged rewards, loss and the
method's numbers are the global batch's; the training model calls are summed over the processes. The
evaluation's images are generated in shards and gathered (:meth:`Session.generate_all`), so its numbers are one
process's; only the first process writes.
``--fsdp`` (with ``--lora-rank 0``) shards the weights, their gradients and AdamW's state over the processes
with FSDP2 (:mod:`adjointdpm.fsdp`; equal shards of the batch, FSDP2 averaging their gradients); checkpoints and
the written weights hold the whole tensors, gathered.

Outputs: a LoRA as diffusers' ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(OUT)``,
``adjointdpm sample --lora OUT``), full weights as ``unet/`` (``--lora-rank 0``); the text encoders stay
frozen. ``--report-to tensorboard`` writes scalars and image grids through accelerate's TensorBoard tracker
into ``--out/logs``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from . import prompt_embeddings
from .errors import UserInputError
from .options import option, settings_of
from .session import Session
from .task import Application, Evaluation, ParamGroup, Task
from .weights import save_weights, trainable_weights

#: the evaluation noises' seed offset from --seed (never trained on: training noises come from the iteration RNG)
EVAL_SEED_OFFSET = 104729

#: per method, what --lr, --lr-scheduler, --reward-scale, --kl and --iters default to (measured on the embedded
#: model's digits recipe, docs/finetune.md: the methods that back-propagate through the sampler at 3e-3 collapse
#: the diversity or break the model — DRaFT-1 did — so 1e-3 (about 2400 model calls each); AlignProp at 1e-3 broke
#: one training seed of three, at 5e-4 none but it kept 55-92 % of the diversity; with the KL anchor at β = 3 over
#: 400 iterations (12 000 calls) it taught both words on training seeds 0-3 and kept 79-92 % of the diversity
#: (β 1 kept less, β 4 and 5 taught "nine" on fewer seeds); a cosine decay from 7e-4 kept 81-89 % and brought
#: the Fréchet distances down (5e-4 cosine taught "eight" to 72 % only); Adjoint Matching moves slowly at 3e-3
#: with λ = 10, and at 1e-2, λ = 30 its best point was 40 iterations: longer runs oscillate)
METHOD_RECIPES = {
    "exact": {"lr": 1e-3, "iters": 40},
    "truncated": {"lr": 1e-3, "iters": 100},
    "alignprop": {"lr": 7e-4, "lr_scheduler": "cosine", "kl": 3.0, "iters": 400},
    "onestep": {"lr": 1e-3, "iters": 130},
    "adjoint": {"lr": 1e-3, "iters": 40},
    "adjoint-matching": {"lr": 1e-2, "reward_scale": 30.0, "iters": 40},
}
#: the learning-rate schedules --lr-scheduler takes: diffusers.optimization's (its training scripts' choices)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

#: the method of ``adjointdpm finetune`` without --method (the best of the measured table, docs/finetune.md: over
#: training seeds 0-7 its recipe, AlignProp with the KL anchor and a cosine decay, gave "eight" 72-97 % and
#: "nine" 91-100 % on fresh seeds, the known digits ≥ 94 %, 81-94 % of their diversity kept and no image off the
#: manifold on any seed; at a constant rate, images off the manifold on three seeds of eight)
DEFAULT_METHOD = "alignprop"


@dataclass
class Options:
    """finetune's options (its command line; the defaults are the recipe of docs/finetune.md)."""

    prompts: Optional[str] = option(None, "--prompts", help="Training prompts: a .txt file (one per line), a .jsonl "
                                    "file ({\"prompt\": ..., any fields a reward reads, e.g. \"class\"}) or a "
                                    "built-in set: digits | simple-animals (default: digits on the embedded model, "
                                    "simple-animals otherwise).")
    eval_prompts: Optional[str] = option(None, "--eval-prompts", help="Evaluation prompts (a file or a built-in set) "
                                         "(default: the training prompts).")
    reward: Optional[list[str]] = option(None, "--reward", help="Reward to maximise, [WEIGHT*]KIND:TARGET, "
                                         "repeatable (a weighted sum): clip:, pickscore:, aesthetic:, hpsv2:, "
                                         "classifier: FOLDER, FILE.py:FUNC, package.module:FUNC, or on a digits "
                                         "model digits-guide (default there: digits-guide).")
    judge_reward: Optional[str] = option(None, "--judge-reward", help="Evaluation-only reward SPEC, never optimised "
                                         "(default on a digits model: digits-judge, its independent judge).")
    method: Optional[str] = option(None, "--method", help="exact | truncated:k=K | alignprop | onestep | adjoint | "
                                   f"adjoint-matching, options after a colon (default: {DEFAULT_METHOD}).")
    reward_scale: Optional[float] = option(None, "--reward-scale", help="Adjoint Matching's λ > 0: it fine-tunes "
                                           "towards p_base·exp(λ·reward) (default: its recipe's, "
                                           f"{METHOD_RECIPES['adjoint-matching']['reward_scale']:g}).")
    kl: Optional[float] = option(None, "--kl", help="The KL anchor's weight β ≥ 0 for the methods that back-propagate "
                                 "through the sampler (exact, truncated, alignprop, adjoint): β·‖ε_θ − ε_base‖² at "
                                 "re-noised samples keeps the model near the base distribution (default: the "
                                 "method's recipe's; 0: off).")
    lora_rank: int = option(4, "--lora-rank", help="LoRA rank (peft); 0 fine-tunes all the weights of the "
                                                   "denoising network (the text encoders stay frozen).")
    fsdp: bool = option(False, "--fsdp/--no-fsdp", help="With --lora-rank 0 under torchrun or accelerate launch "
                        "--multi_gpu: shard the weights, their gradients and the optimiser's state over the processes "
                        "(torch's FSDP2 on each block of the network and on the network); --batch a multiple of "
                        "the number of processes.")
    lr: Optional[float] = option(None, "--lr", help="AdamW learning rate (default: the method's recipe).")
    lr_scheduler: Optional[str] = option(None, "--lr-scheduler", help="How the learning rate changes over the "
                                         f"iterations, diffusers' schedules: {' | '.join(LR_SCHEDULES)} "
                                         "(default: the method's recipe's, constant if it names none).")
    lr_warmup_steps: int = option(0, "--lr-warmup-steps", help="Iterations of linear warm-up from 0 to --lr "
                                  "(schedules other than constant).")
    max_grad_norm: float = option(0.0, "--max-grad-norm", help="Clip the global norm of the weights' gradient "
                                  "to this before each step (diffusers' training scripts use 1.0; default 0: no "
                                  "clipping, the measured recipes of docs/finetune.md).")
    batch: int = option(8, "--batch", help="Prompts (and noises) per iteration.")
    iters: Optional[int] = option(None, "--iters", help="Optimisation iterations (default: the method's recipe).")
    eval_every: int = option(10, "--eval-every", help="Evaluate every K iterations (and before and after).")
    eval_seeds: int = option(4, "--eval-seeds", help="Images per evaluation prompt (the same noises every time).")
    keep_best: bool = option(False, "--keep-best/--no-keep-best", help="Write the weights of the evaluation with the "
                             "highest optimised reward (never the judge's), not the last iteration's: transformers' "
                             "load_best_model_at_end. Training itself is unchanged.")
    report_to: str = option("none", "--report-to", help="none | tensorboard (scalars and image grids under "
                                                        "--out/logs, through accelerate's tracker).")

    def __post_init__(self):
        if self.iters is None:  # (resolved here: the loop reads the iterations before the run is built)
            self.iters = METHOD_RECIPES.get(method_name(self.method), {}).get("iters", 40)


def method_name(spec: str | None) -> str:
    """The method a --method spec names (the default one for None), spelled as METHOD_RECIPES keys it."""
    return (spec or DEFAULT_METHOD).strip().partition(":")[0].strip().lower().replace("_", "-")


#: what summary.json's settings hold and --resume compares, in this order
SETTINGS = ("prompts", "eval_prompts", "reward", "judge_reward", "method", "reward_scale", "lora_rank", "lr",
            "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "keep_best", "batch", "eval_every", "eval_seeds")


def method_recipe(options: Options):
    """The method ``options`` name, with its recipe's λ, KL anchor and learning rate where not given:
    (method, learning rate)."""
    from ..finetuning import MethodError, parse_method

    spec = options.method or DEFAULT_METHOD
    if options.reward_scale is not None and not (options.reward_scale > 0 and math.isfinite(options.reward_scale)):
        raise UserInputError(f"--reward-scale must be a number > 0 (Adjoint Matching's λ), got {options.reward_scale:g}")
    recipe = METHOD_RECIPES.get(method_name(spec), {})
    scale = options.reward_scale if options.reward_scale is not None else recipe.get("reward_scale")
    if options.kl is not None and not (options.kl >= 0 and math.isfinite(options.kl)):
        raise UserInputError(f"--kl must be a number ≥ 0 (the KL anchor's weight; 0 switches it off), got {options.kl:g}")
    kl = options.kl if options.kl is not None else recipe.get("kl")
    try:
        method = parse_method(spec, reward_scale=scale, kl=kl)
    except MethodError as e:
        raise UserInputError(f"--method: {e}") from None
    if options.reward_scale is not None and not hasattr(method, "reward_scale"):
        raise UserInputError(f"--reward-scale is Adjoint Matching's λ; the method {method.name!r} does not use it")
    if options.kl is not None and not hasattr(method, "anchor"):
        raise UserInputError(f"--kl is the KL anchor of the methods that back-propagate through the sampler (exact, "
                             f"truncated, alignprop, adjoint); the method {method.name!r} does not take it")
    lr = options.lr if options.lr is not None else recipe.get("lr", 1e-3)
    if not lr > 0:
        raise UserInputError(f"--lr must be > 0, got {lr:g}")
    return method, float(lr)


def lr_schedule_of(options: Options) -> str:
    """The learning-rate schedule ``options`` name (else the method's recipe's, else constant), checked."""
    name = options.lr_scheduler or METHOD_RECIPES.get(method_name(options.method), {}).get("lr_scheduler", "constant")
    if name not in LR_SCHEDULES:
        raise UserInputError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULES)}, got {name!r}")
    if options.lr_warmup_steps < 0:
        raise UserInputError(f"--lr-warmup-steps must be >= 0, got {options.lr_warmup_steps}")
    if options.lr_warmup_steps > 0 and name == "constant":
        raise UserInputError("--lr-warmup-steps needs a schedule with a warm-up: pass --lr-scheduler "
                             "constant_with_warmup (or linear, cosine, …)")
    return name


def build(session: Session, options: Options, seed: int = 0) -> "FinetuneTask":
    """The finetune run ``options`` describe: prompts, rewards and judge (:func:`.choose.finetune_rewards`),
    the method and its recipe, all checked before anything runs."""
    from ..finetuning import MethodError
    from ..prompts import PromptError, resolve_prompts
    from .choose import finetune_rewards

    method, lr = method_recipe(options)
    lr_scheduler = lr_schedule_of(options)
    try:
        method.check_sampler(session.solver, session.eta)
    except MethodError as e:
        raise UserInputError(f"--method: {e}") from None
    default_prompts = "digits" if session.comps.settings.get("words") else "simple-animals"
    prompts_source = options.prompts or default_prompts
    eval_source = options.eval_prompts or prompts_source
    prompt_sets = []
    for flag, source in (("--prompts", prompts_source), ("--eval-prompts", eval_source)):
        try:
            prompt_sets.append(resolve_prompts(source))
        except PromptError as e:
            raise UserInputError(f"{flag}: {e}") from None
    train, held = prompt_sets
    reward, judge, reward_specs, judge_spec = finetune_rewards(session, options)
    resolved = replace(options, prompts=str(prompts_source), eval_prompts=str(eval_source), reward=reward_specs,
                       judge_reward=judge_spec, method=method.spec, lr=lr, lr_scheduler=lr_scheduler,
                       reward_scale=getattr(method, "reward_scale", None))
    return FinetuneTask(session, resolved, method, reward, judge, train, held, seed=seed)


class FinetuneTask(Task):
    name = "finetune"

    def __init__(self, session: Session, opts: Options, method, reward, judge, train_prompts, eval_prompts,
                 seed: int = 0):
        """``reward``: a :class:`~adjointdpm.rewards.RewardSum`; ``judge``: a reward or None; the prompts:
        lists of :class:`~adjointdpm.prompts.Prompt`."""
        if opts.lora_rank < 0:
            raise UserInputError(f"--lora-rank must be >= 0 (0: all the weights), got {opts.lora_rank}")
        if not (opts.max_grad_norm >= 0 and math.isfinite(opts.max_grad_norm)):
            raise UserInputError(f"--max-grad-norm must be a number >= 0 (0: no clipping), got {opts.max_grad_norm:g}")
        if min(opts.batch, opts.eval_every, opts.eval_seeds) < 1:
            raise UserInputError("--batch, --eval-every and --eval-seeds must be >= 1")
        if opts.report_to not in ("none", "tensorboard"):
            raise UserInputError(f"--report-to must be none or tensorboard, got {opts.report_to!r}")
        self.dp = session.dp
        if getattr(self.dp, "shards_weights", False):
            raise UserInputError("finetune shards the weights itself (--fsdp with --lora-rank 0), not through accelerate's "
                                 "FSDP configuration: launch with torchrun or accelerate launch --multi_gpu, and pass --fsdp")
        if opts.fsdp:
            self._check_fsdp(opts)
        if opts.batch < self.dp.world_size:
            raise UserInputError(f"--batch ({opts.batch}) must be at least the number of processes ({self.dp.world_size}): "
                                 "each process samples its share of the batch")
        self.session, self.opts, self.method, self.reward, self.judge, self.seed = session, opts, method, reward, judge, seed
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        for p in {p.text for p in self.train_prompts + self.eval_prompts}:
            session.check_prompt(p)
        self._probe()
        self.tracker = None

    # ------------------------------------------------------------------ checks before anything runs
    def _check_fsdp(self, opts: Options) -> None:
        world = self.dp.world_size
        if opts.lora_rank != 0:
            raise UserInputError("--fsdp shards all the weights: use it with --lora-rank 0 (a LoRA is small enough to "
                                 "replicate: leave --fsdp out)")
        if world < 2:
            raise UserInputError("--fsdp shards the weights over the processes of a launch (torchrun --nproc_per_node P, "
                                 "or accelerate launch --multi_gpu); this run has one process")
        if opts.batch % world:
            raise UserInputError(f"--fsdp needs --batch ({opts.batch}) to be a multiple of the number of processes "
                                 f"({world}): FSDP averages the processes' gradients, the global batch's mean only "
                                 "over equal shards")

    def _probe(self) -> None:
        """Call the reward (and the judge) once on two images of the model's shape: a wrong shape or no
        gradient is one line now, before the run writes anything."""
        from ..critics.errors import CriticError
        from ..prompts import texts_and_fields
        from .image_files import image_shape

        c, h, w = image_shape(self.session.comps)
        texts, fields = texts_and_fields(self.train_prompts[:1] * 2)
        x = torch.zeros(2, c, h, w, device=self.session.device, requires_grad=True)
        for what, r, needs_grad in (("--reward", self.reward, True), ("--judge-reward", self.judge, False)):
            if r is None:
                continue
            with torch.enable_grad():
                try:
                    value = r(x, texts, fields)
                except CriticError as e:
                    raise UserInputError(str(e) if str(e).startswith(what) else f"{what}: {e}") from None
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (2,):
                raise UserInputError(f"{what} must return one value per image, shape (2,) for 2 images")
            if needs_grad and not value.requires_grad:
                raise UserInputError(f"{what} returned no gradient with respect to the images: compute it with "
                                     "differentiable torch operations (no .detach(), numpy or PIL)")

    # ------------------------------------------------------------------ the run
    def describe(self) -> dict:
        # (a decaying learning rate follows --iters: a run resumed with other --iters would change its schedule)
        horizon = None if self.opts.lr_scheduler == "constant" else self.opts.iters
        return {**self.session.describe(), **settings_of(self.opts, SETTINGS), "lr_schedule_iters": horizon,
                "reward_terms": self.reward.describe(), "judge": None if self.judge is None else self.judge.describe()}

    def setup(self) -> None:
        from ..prompts import texts_and_fields

        s, o = self.session, self.opts
        self.train_texts, self.train_fields = texts_and_fields(self.train_prompts)
        self.train_table = s.encode(sorted(set(self.train_texts)))
        self.train_rows = sorted(set(self.train_texts))
        texts, fields = texts_and_fields(self.eval_prompts)
        S = o.eval_seeds
        self.eval_texts = [t for t in texts for _ in range(S)]
        self.eval_fields = [dict(f) for f in fields for _ in range(S)]
        eval_rows = sorted(set(texts))
        table = s.encode(eval_rows)
        self.eval_cond = prompt_embeddings.rows(table, torch.tensor([eval_rows.index(t) for t in self.eval_texts]))
        seed = self.seed + EVAL_SEED_OFFSET
        noise = s.noise(S, seed)  # image i: prompt i // S, seed j = i % S (the same noises for every prompt)
        self.eval_noise = noise.repeat(len(texts), *[1] * (noise.dim() - 1))
        self.eval_streams = s.noise_streams([j for _ in texts for j in range(S)], seed)
        self.params = trainable_weights(s.comps, o.lora_rank, self.seed)
        # the base model the evaluation's manifold flag reads (full weights: a host copy, taken before any step)
        self.base_weights = (None if o.lora_rank > 0 else
                             {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()})
        self.manifold_calibration = None
        self.method.prepare(s.network)  # (Adjoint Matching's frozen copy of the base weights: before any sharding)
        if o.fsdp:
            from ..fsdp import shard_network

            shard_network(s.network)
            self.params = dict(s.network.named_parameters())  # (the sharded weights are new tensors)
        if self.dp.world_size > 1 and hasattr(self.method, "gather"):
            self.method.gather = self.dp.gather_shards  # Adjoint Matching's outlier percentile: the global batch's
        # the run's own record (resumed with the checkpoint): training model calls and seconds, evaluations
        self.train_calls, self.train_seconds, self.done = 0, 0.0, 0
        self.evaluations: list[dict] = []
        self.before_images: torch.Tensor | None = None
        self.last_images: torch.Tensor | None = None
        self.alarms: list[dict] = []  # every evaluation at which the reward-hacking alarm rang
        #: --keep-best: the weights of the evaluation with the highest optimised reward, and its record
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best: dict | None = None
        if self.opts.report_to == "tensorboard" and self.out is not None and self.dp.is_main:
            from accelerate.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker("", self.out / "logs")
            self.tracker.start()

    def param_groups(self):
        return [ParamGroup("lora" if self.opts.lora_rank > 0 else "unet", self.params,
                           {"lr": self.opts.lr, "weight_decay": 0.0})]

    def make_optimizer(self, groups):
        """AdamW with diffusers' learning-rate schedule over ``--iters`` (:meth:`before_step` sets each
        iteration's rate from the iteration alone, so a resumed run follows the same schedule)."""
        from diffusers.optimization import get_scheduler

        opt = super().make_optimizer(groups)
        self.lr_schedule = get_scheduler(self.opts.lr_scheduler, opt, num_warmup_steps=self.opts.lr_warmup_steps,
                                         num_training_steps=self.opts.iters)
        return opt

    def counted_modules(self):
        return [self.session.network]

    def rollout(self, x_T: torch.Tensor, cond):
        from ..finetuning import Rollout

        s = self.session
        return Rollout(s.network, x_T, schedule=s.schedule, timesteps=s.timesteps(), cond=cond,
                       uncond=s.uncond if s.guidance_scale != 1.0 else None, guidance_scale=s.guidance_scale,
                       solver=s.solver, eta=s.eta, prediction_type=s.comps.prediction_type)

    def reward_of(self, texts: list[str], fields: list[dict], logs: dict):
        """The closure the methods maximise: R(decode(x_0)) for these prompts; each term's mean into ``logs``."""
        def reward(x0: torch.Tensor) -> torch.Tensor:
            total, terms = self.reward.terms(self.session.decode(x0).float(), texts, fields)
            logs.update({f"reward/{k}": float(v.detach().mean()) for k, v in terms.items()})
            return total
        return reward

    def compute_loss(self, iteration, generator):
        from ..finetuning import MethodError

        t0 = time.perf_counter()
        o, s = self.opts, self.session
        self.done = iteration + 1
        # the global batch, drawn as in one process; this process samples its rows start … stop of it
        idx = torch.randint(len(self.train_prompts), (o.batch,), generator=generator)
        x_T = s.noise(o.batch, int(torch.randint(0, 2**62, (1,), generator=generator)))
        start, stop = self.dp.shard_bounds(o.batch)
        idx, x_T = idx[start:stop], x_T[start:stop]
        texts = [self.train_texts[i] for i in idx.tolist()]
        fields = [dict(self.train_fields[i]) for i in idx.tolist()]
        cond = prompt_embeddings.rows(self.train_table, torch.tensor([self.train_rows.index(t) for t in texts]))
        rollout = self.rollout(x_T, cond)
        if self.dp.world_size > 1:
            rollout = replace(rollout, rows=(start, stop, o.batch))
        logs: dict = {}
        try:
            report = self.method.backward(rollout, self.reward_of(texts, fields, logs), generator)
        except MethodError as e:
            raise UserInputError(f"--reward: {e}") from None
        logs.update(reward=float(report.rewards.mean()))
        for k, v in report.stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                logs[f"method/{k}"] = float(v)
        loss, logs, calls = self._global(report, logs)
        self.train_calls += calls
        self.train_seconds += time.perf_counter() - t0
        logs = {"reward": logs.pop("reward"), **logs, "method_calls": float(calls)}
        logs = {k: v for k, v in logs.items() if not k.startswith("method/") or math.isfinite(v)}
        if self.tracker is not None:
            self.tracker.log({"train/loss": loss, **{f"train/{k}": v for k, v in logs.items()}}, step=iteration + 1)
        # (the method has back-propagated into p.grad itself: the loop only steps, after before_step's clipping)
        self._step_logs = logs
        # (each process hands the loop its share of the loss: the loop sums them over the processes)
        return torch.tensor(report.loss * self.dp.loss_weight(o.batch), dtype=torch.float64), logs

    def _global(self, report, logs: dict) -> tuple[float, dict, int]:
        """Several processes: weight this process's gradient by its share B_p / B of the global batch (the
        method back-propagated its shard's mean loss; the loop sums the gradients over the processes), and
        pool what it logs: the loss, rewards and the method's numbers as the global batch's means (each process's
        mean weighted by its share), the model calls summed over the processes. One process: as they are."""
        if self.dp.world_size == 1:
            return report.loss, logs, report.model_calls
        w = self.dp.loss_weight(self.opts.batch)
        with torch.no_grad():
            for p in self.params.values():
                if p.grad is not None and not self.opts.fsdp:  # (--fsdp: FSDP2 averaged equal shards already)
                    p.grad.mul_(w)
        keys = sorted(logs)
        local = torch.tensor([report.loss * w, *(logs[k] * w for k in keys), float(report.model_calls)],
                             dtype=torch.float64)
        pooled = self.dp.sum(local).tolist()
        return pooled[0], dict(zip(keys, pooled[1:-1])), int(round(pooled[-1]))

    def before_step(self, iteration: int) -> None:
        """Clip the global gradient norm (after the processes' gradients are reduced); log it unclipped."""
        limit = self.opts.max_grad_norm
        from ..fsdp import full_tensor, reshard

        if self.opts.fsdp:  # (the step updates the shards: no gathered weights of an evaluation may stay in use)
            reshard(self.session.network)
        # (--fsdp: the gradients are sharded DTensors; torch's clip takes the norm over the whole of them)
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), limit if limit > 0 else math.inf)
        self._step_logs["grad_norm"] = float(full_tensor(norm))
        for group, factor in zip(self.lr_schedule.optimizer.param_groups, self.lr_schedule.lr_lambdas):
            group["lr"] = group["initial_lr"] * factor(iteration)
        self._step_logs["lr"] = self.lr_schedule.optimizer.param_groups[0]["lr"]

    def after_step(self, iteration: int) -> None:
        done = iteration + 1
        if done % self.opts.eval_every == 0 and done < self.opts.iters:
            self.evaluate(f"iteration {done}", iteration=done)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, stage: str, iteration: int | None = None) -> Evaluation:
        evaluation = self._evaluate(stage)
        if self.opts.keep_best:
            self._keep_best(stage, evaluation.metrics)
            if stage == "after" and self.best is not None and self.best["iteration"] != self.done:
                self._restore_best()
                self.evaluations.pop()
                evaluation = self._evaluate("after")
        return evaluation

    def _keep_best(self, stage: str, metrics: dict) -> None:
        """--keep-best: remember the trainable weights when the optimised reward is the highest so far."""
        if self.best is None or metrics["reward"] > self.best["reward"]:
            self.best = {"iteration": self.done, "reward": metrics["reward"], "stage": stage.split(" ")[0]}
            self.best_weights = {k: p.detach().clone() for k, p in self.params.items()}

    def _restore_best(self) -> None:
        if self.opts.fsdp:  # (the shards change: the root's weights an evaluation gathered must not stay in use)
            from ..fsdp import reshard

            reshard(self.session.network)
        for k, p in self.params.items():
            p.data.copy_(self.best_weights[k])
        if self.dp.is_main:
            print(f"finetune: --keep-best: the weights of iteration {self.best['iteration']} (optimised reward "
                  f"{self.best['reward']:.4g}, the highest evaluated) replace the last iteration's", flush=True)

    def _evaluate(self, stage: str) -> Evaluation:
        from ..rewards import diversity, group_by_prompt, hacking_alarm

        s = self.session
        images, z, flags = self._sample_and_flag(stage)
        total, terms = self.reward.terms(images, self.eval_texts, self.eval_fields)
        metrics = {"reward": float(total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in terms.items()}}
        per_prompt = {p: {"reward": float(v.mean())} for p, v in group_by_prompt(total[:, None], self.eval_texts).items()}
        features = None
        if self.judge is not None:
            scores = self.judge(images, self.eval_texts, self.eval_fields)
            metrics["judge"] = float(scores.mean())
            for p, v in group_by_prompt(scores[:, None], self.eval_texts).items():
                per_prompt[p]["judge"] = float(v.mean())
            accuracy = getattr(self.judge, "accuracy", None)
            if accuracy is not None:
                acc = accuracy(images, self.eval_texts, self.eval_fields)
                metrics["judge_accuracy"] = float(acc.mean())
                for p, v in group_by_prompt(acc[:, None], self.eval_texts).items():
                    per_prompt[p]["judge_accuracy"] = float(v.mean())
            features = self.judge.features(images)
        if features is None:
            features = self.reward.features(images)
        if features is not None and self.opts.eval_seeds >= 2:
            d = diversity(group_by_prompt(features, self.eval_texts))
            metrics["diversity"] = d["mean"]
            for p, v in d["per_prompt"].items():
                per_prompt[p]["diversity"] = v
        flag = {}
        if z is not None:  # the images off the base model's manifold
            flagged = [i for i, f in enumerate(flags.tolist()) if f]
            flag = {"flagged": len(flagged), "flagged_fraction": len(flagged) / len(z)}
            metrics.update(manifold_z=[round(float(v), 2) for v in z], off_manifold_count=len(flagged),
                           off_manifold_fraction=len(flagged) / len(z), off_manifold_images=flagged)
            for p, v in group_by_prompt(flags.float()[:, None], self.eval_texts).items():
                per_prompt[p]["off_manifold"] = int(v.sum())
            if stage == "before":
                metrics["manifold_calibration"] = self.manifold_calibration.describe()
        metrics["per_prompt"] = per_prompt
        point = {"stage": stage.split(" ")[0], "iteration": self.done, "calls": self.train_calls,
                 "seconds": round(self.train_seconds, 3),
                 **{k: metrics[k] for k in ("reward", "judge", "judge_accuracy", "diversity") if k in metrics}, **flag}
        self.evaluations.append(point)
        self.last_images = images.cpu()
        if stage == "before":
            self.before_images = images.cpu()
        if "judge" in metrics:
            # (a fall of more than 5 % of the judge's best: evaluation noise on a few seeds does not ring it)
            alarm = hacking_alarm([e["reward"] for e in self.evaluations], [e["judge"] for e in self.evaluations],
                                  relative=0.05, optimised_name="the optimised reward", judge_name="the judge's reward")
            if alarm is not None:
                self.alarms.append({"iteration": self.done, "message": alarm})
                if self.dp.is_main:
                    print(f"finetune: {alarm}", flush=True)
        if self.tracker is not None:
            from ..images import make_grid

            step = self.done
            self.tracker.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
            grid = make_grid(images.cpu(), nrow=self.opts.eval_seeds)  # (H, W) grey or (H, W, 3), uint8
            grid = grid[None, :, :, None] if grid.ndim == 2 else grid[None]
            self.tracker.log_images({"eval/images": grid}, step=step, dataformats="NHWC")
        from .manifold import flag_captions

        return Evaluation(images, metrics, nrow=self.opts.eval_seeds,
                          captions=None if z is None else flag_captions(z, flags))

    def _sample_and_flag(self, stage: str):
        """The evaluation images (all of them, on every process) and each one's denoising-error z-score and
        flag under the base model; the first evaluation calibrates the flag (on the before-images, or on a
        resumed run on the base model's samples of the same noises). A single evaluation image has no spread to
        calibrate on: then z and the flags are None."""
        from .manifold import ManifoldCalibration, base_sampler, denoising_error, off_manifold

        s = self.session
        n = self.eval_noise.shape[0]
        index = s.rows_here(n)  # this process's rows, as Session.generate_all shares them
        cond = prompt_embeddings.rows(self.eval_cond, index)
        noise = None if self.eval_streams is None else self.eval_streams.rows(index)
        sampler = base_sampler(s.network, s.schedule, s.timesteps(0), s.comps.prediction_type)

        def latents_of() -> torch.Tensor:
            return s.sample_latents(self.eval_noise[index], cond, noise=noise)

        def base_errors(latents: torch.Tensor) -> torch.Tensor:
            with self._base_model():
                return s.gather_rows(denoising_error(sampler, latents, cond), n)

        latents = latents_of()
        images = s.gather_rows(s.decode_images(latents), n)
        if n < 2:
            return images, None, None
        errors = base_errors(latents)
        if self.manifold_calibration is None:
            if stage == "before":
                plain = errors
            else:  # a resumed run: the base model's images of the evaluation noises
                with self._base_model():
                    plain_latents = latents_of()
                plain = base_errors(plain_latents)
            self.manifold_calibration = ManifoldCalibration.from_errors(plain)
        z = self.manifold_calibration.z(errors).float()
        return images, z, off_manifold(z, self.manifold_calibration.threshold)

    @contextmanager
    def _base_model(self):
        """The network as it was before training, for the duration: the LoRA adapters switched off, or the full
        weights swapped for their host copy (and back)."""
        network = self.session.network
        if self.base_weights is None:  # (the adapters switched off, the parameters' requires_grad kept)
            from ..finetuning import BaseModel

            with BaseModel(network)():
                yield
            return
        from ..fsdp import like, reshard

        if self.opts.fsdp:  # (FSDP2 may still hold the gathered weights of the last forward)
            reshard(network)
        trained = {k: p.detach().clone() if self.opts.fsdp else p.detach().to("cpu", copy=True)
                   for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(like(p, self.base_weights[k]))
        try:
            yield
        finally:
            if self.opts.fsdp:
                reshard(network)
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(trained[k])

    # ------------------------------------------------------------------ state a resumed run needs
    def state_tensors(self) -> dict[str, torch.Tensor]:
        import json

        record = {"train_calls": self.train_calls, "train_seconds": self.train_seconds, "done": self.done,
                  "evaluations": self.evaluations, "alarms": self.alarms, "method": self.method.state_dict(),
                  "best": self.best}
        data = json.dumps(record).encode()
        best = {f"best/{k}": v.contiguous() for k, v in (self.best_weights or {}).items()}
        return {"record": torch.tensor(list(data), dtype=torch.uint8), **best}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        import json

        if "record" not in tensors:
            return
        record = json.loads(bytes(tensors["record"].tolist()).decode())
        self.train_calls, self.train_seconds = int(record["train_calls"]), float(record["train_seconds"])
        self.done = int(record["done"])
        self.evaluations, self.alarms = record["evaluations"], record["alarms"]
        self.method.load_state_dict(record["method"])
        self.best = record.get("best")
        if self.best is not None:
            from ..fsdp import like

            self.best_weights = {k: like(p.detach(), tensors[f"best/{k}"]) for k, p in self.params.items()}

    # ------------------------------------------------------------------ outputs
    def summarize(self, before, after):
        out = {"evaluations": self.evaluations, "hacking_alarm": self.alarms[-1]["message"] if self.alarms else None,
               "hacking_alarms": self.alarms,
               "metrics_from": ("the optimised reward and the judge (independent, never optimised)" if self.judge is not None
                                else "the optimised reward only (no --judge-reward: not an independent evaluation)")}
        if "diversity" in after and before.get("diversity"):
            out["diversity_kept"] = after["diversity"] / before["diversity"]
        if self.opts.keep_best:
            out["kept_best"] = self.best
        if "off_manifold_count" in after:  # the final evaluation's images off the base model's manifold
            out.update(off_manifold_after=after["off_manifold_count"],
                       off_manifold_images_after=after["off_manifold_images"],
                       off_manifold_per_prompt_after={p: v["off_manifold"] for p, v in after["per_prompt"].items()},
                       manifold_calibration=before.get("manifold_calibration"))
        return out

    def pipeline_call(self) -> dict:
        """The evaluation noises and prompts (after/) with the trained LoRA (the output folder) or network folder."""
        from .pipeline_call import pipeline_call
        from .weights import saved_weights_call

        return pipeline_call(self.session, tensors={"latents": "eval_latents.safetensors:latents"},
                             prompts=list(self.eval_texts), **saved_weights_call(self.session.comps, self.opts.lora_rank))

    def write_artifacts(self, out):
        from ..fsdp import full_weights, saving_full_weights

        full = full_weights(self.session.network, keep=self.dp.is_main)  # (--fsdp: gathered by every process)
        if not self.dp.is_main:  # (the weights and every record are the same in every process)
            return {}
        with saving_full_weights(self.session.network, full):
            files = {**save_weights(self.session.comps, out, self.opts.lora_rank)}
        from safetensors.torch import save_file

        save_file({"latents": self.eval_noise.cpu().contiguous()}, str(out / "eval_latents.safetensors"))
        files["eval_latents"] = "eval_latents.safetensors"
        files.update(self._write_prompt_grids(out))
        self._plot_curves(out / "curves.png")
        files["curves"] = "curves.png"
        if self.tracker is not None:
            self.tracker.finish()
            files["logs"] = "logs/"
        return files

    def _write_prompt_grids(self, out: Path) -> dict:
        """``prompts/NN.png``: evaluation prompt NN's before row above its after row."""
        from ..images import make_grid, save_png

        S = self.opts.eval_seeds
        before = self.before_images
        if before is None:  # a resumed run: the before images it wrote
            before = _read_images(out / "before", len(self.eval_texts))
        if before is None:
            return {}
        after = self.last_images
        (out / "prompts").mkdir(exist_ok=True)
        for n in range(len(self.eval_texts) // S):
            rows = torch.cat([before[n * S:(n + 1) * S], after[n * S:(n + 1) * S]])
            save_png(make_grid(rows, nrow=S, zoom=max(1, 64 // rows.shape[-1])), out / "prompts" / f"{n:02d}.png")
        return {"prompt_grids": "prompts/"}

    def _plot_curves(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        points = self.evaluations
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
        for ax, key, label in ((axes[0], "calls", "training model calls"), (axes[1], "seconds", "training seconds")):
            xs = [p[key] for p in points]
            ax.plot(xs, [p["reward"] for p in points], marker="o", label="optimised reward")
            if all("judge" in p for p in points):
                ax.plot(xs, [p["judge"] for p in points], marker="s", label="judge's reward")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_title(f"finetune ({self.opts.method})")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _read_images(folder: Path, n: int) -> torch.Tensor | None:
    """The ``NNN.png`` images a stage wrote, back in [-1, 1] (None when they are not all there)."""
    import numpy as np
    from PIL import Image

    files = [folder / f"{i:03d}.png" for i in range(n)]
    if not all(f.is_file() for f in files):
        return None
    arrays = [np.asarray(Image.open(f), dtype=np.float32) / 127.5 - 1 for f in files]
    t = torch.from_numpy(np.stack(arrays))
    return t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)


APPLICATION = Application(
    name="finetune", options=Options, build=build, report_keys=("reward", "judge", "judge_accuracy", "diversity",
                                                                 "off_manifold_fraction"),
    help="Reward fine-tuning over prompts: LoRA or all weights, by the exact gradient, DRaFT-K, AlignProp, ReFL, "
         "the continuous adjoint or Adjoint Matching.")
