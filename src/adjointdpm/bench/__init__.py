"""Benchmarks of the gradient engine (``python -m adjointdpm.bench --help``).

Subcommands (see docs/benchmarks.md for what each measures and the measured results):

    python -m adjointdpm.bench            issue 2: every grad mode × N ∈ {10, 25, 50, 100} on a 64×64 UNet:
                                          error vs float64 backprop, peak memory (fresh process), time
    python -m adjointdpm.bench cpu        issue 5's CPU suite: + torchdiffeq.odeint_adjoint, ddim and dpmpp2m,
                                          gradients for x_T, embeddings and weights, plots (``--quick``)
    python -m adjointdpm.bench gpu        issue 5's GPU suite: SD-1.5-sized models, 512², peak GPU memory and
                                          s/step for x_T, embeddings, LoRA, full weights (``--reduced`` on CPU)
    python -m adjointdpm.bench report F   tables (and ``--img DIR`` plots) from a results JSON
"""
