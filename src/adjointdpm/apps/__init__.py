"""The paper's applications on any diffusers model, each a small module on one shared spine.

An application = its ``Options`` (a dataclass whose fields are its command-line options: the one source of
its defaults and help), a :class:`~.task.Task` (variables + objective + optimiser + evaluation) and
``build(session, options, seed)``; its ``APPLICATION`` record is listed in :mod:`.registry`, from which the
commands, ``reproduce`` and the report line come.

* :mod:`.guide`       guided sampling / vocabulary expansion
* :mod:`.audit`       security auditing (bounded attacks on x_T against a classifier or a safety filter)
* :mod:`.stylize`     weight fine-tuning towards one reference image's style (full or LoRA), or any loss
* :mod:`.invert`      visual effect or any loss → text embedding
* :mod:`.registry`    the applications by name; :mod:`.launch` one run from options (processes, session, loop)
* :mod:`.options`     options as dataclass fields, the shared option groups, their typer form
* :mod:`.session`     the model and its sampler (the one place an application meets the engine)
* :mod:`.choose`      which objective a run gets from its options (the one place that knows the digits
  model's objectives, :mod:`adjointdpm.embedded.digit_objectives`); the objectives' protocols are
  :mod:`adjointdpm.critics.objectives`
* :mod:`.task` the application and task API; :mod:`.loop` the loop; :mod:`.call_count` the model-call
  count; :mod:`.checkpoint` the checkpoint files; :mod:`.outputs` images, curves and summary.json
* :mod:`.checks`, :mod:`.image_files`, :mod:`.metrics`, :mod:`.prompt_embeddings`, :mod:`.optimizers`,
  :mod:`.weights`: input checks, image inputs, PSNR, conditioning batches, normalised steps, LoRA / weights
* :mod:`.baselines`   ``--grad`` (the engine's modes and the one-step x̂₀ baseline); :mod:`.errors` errors
* :mod:`.reproduce`   all four with their baselines on the digits model → docs/results.md (:mod:`.report`)
* :mod:`.pipeline_call` every run's ``pipeline_call.json`` (the diffusers call that makes its ``after/``) and
  :func:`replay`, which makes it

Imports point one way: registry → applications → choose / session → critics / engine; report ← reproduce.
The typer commands are in :mod:`adjointdpm.commands`.
"""


def replay(out, model=None, device="cpu", dtype=None):
    """The images (B, 3, H, W) in [0, 1] the diffusers pipeline makes from ``out/pipeline_call.json``: the run's
    ``after/`` (see :func:`.pipeline_call.replay`)."""
    from .pipeline_call import replay as replay_call

    return replay_call(out, model, device, dtype)
