"""The paper's four applications on any diffusers model, as one shared optimisation loop.

* :mod:`.loop`      the loop: progress, model-call budget, non-finite checks, atomic checkpoints, resume, outputs
* :mod:`.common`    the session (model + critics + engine settings) and input checks
* :mod:`.guide`     guided sampling / vocabulary expansion
* :mod:`.audit`     security auditing (classifier and safety-filter attacks on x_T)
* :mod:`.stylize`   weight fine-tuning towards one reference image's style (full or LoRA)
* :mod:`.invert`    visual effect → text embedding
* :mod:`.baselines` the one-step x̂₀ baseline
* :mod:`.reproduce` all four with their baselines → docs/results.md (:mod:`.report`)
* :mod:`.commands`  the typer commands

Imports point one way: tasks → components / critics / engine.
"""
