"""Benchmarks of the gradient engine (``python -m adjointdpm.bench --help``; results in docs/benchmarks.md).

    grad    every gradient mode × N on a 64×64 UNet: error against float64 back-propagation, peak memory
            (fresh process), time (the default subcommand)
    cpu     the same sweep on several models and solvers, with weight gradients and torchdiffeq's
            odeint_adjoint as an outside reference, plotted
    budget  Exact(memory=B): time and peak memory for budgets of 0–100 % of back-propagation's peak and
            for an unlimited budget, against back-propagation
    vae     differentiable VAE decoding: peak memory and time of decode + backward, plain, checkpointed, tiled
    families  x_T and LoRA gradient cost per model family on reduced configs (CPU)
    gpu     model families at their native sizes on a CUDA device (peak GPU memory, seconds per step for
            sampling, x_T, text, LoRA and full fine-tuning); ``--reduced`` runs tiny configs on a CPU
    report  re-print the tables (and draw the plots) of a results JSON
"""
