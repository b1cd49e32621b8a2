"""The paper's four applications on any diffusers model, as one shared optimisation loop.

A task = variables (x_T, an intermediate state, embeddings, weights or LoRA) + an objective (a critic or a
plug-in loss) + an optimiser + an evaluation (the optimised critic's, and a judge's when one is given).

* :mod:`.guide`      guided sampling / vocabulary expansion
* :mod:`.audit`      security auditing (bounded attacks on x_T against a classifier or a safety filter)
* :mod:`.stylize`    weight fine-tuning towards one reference image's style (full or LoRA), or any loss
* :mod:`.invert`     visual effect or any loss → text embedding
* :mod:`.objectives` the generic objectives, judges and attacks over :mod:`adjointdpm.critics`
* :mod:`.choose`     which objective a run gets from the command's options (the one place that knows the
  digits model's objectives, :mod:`adjointdpm.embedded.objectives`)
* :mod:`.loop`       the loop; :mod:`.task` the task API; :mod:`.budget` the model-call count;
  :mod:`.checkpoint` the checkpoint files; :mod:`.outputs` images, curves and summary.json
* :mod:`.common`     the session (model + engine settings) and input checks; :mod:`.errors` errors and exit codes
* :mod:`.baselines`  the one-step x̂₀ baseline
* :mod:`.reproduce`  all four with their baselines on the digits model → docs/results.md (:mod:`.report`)
* :mod:`.commands`   the typer commands

Imports point one way: commands → choose → tasks → objectives → critics / engine; report ← reproduce.
"""
