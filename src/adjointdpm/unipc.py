"""UniPC (UniPCMultistepScheduler): a multistep predictor (UniP) with a corrector (UniC) that reuses the
next network call.

Grid points i = 0…N with (α_i, σ_i, λ_i = log α_i/σ_i); m_i is the model's estimate at point i — x̂₀
(``predict_x0``, the default) or ε̂ — evaluated on the *predicted* state x_i. With h = λ_t − λ_s0 from the
point s0 to the target t, ĥ = −h (x̂₀) or h (ε̂), φ₁ = e^ĥ − 1, B(h) = e^ĥ − 1 ("bh2", the default) or ĥ
("bh1"), the older points s_k give r_k = (λ_{s_k} − λ_s0)/h and D_k = (m_{s_k} − m_s0)/r_k, and

    b_j = j! φ_{j+1}(ĥ) / B(h),   φ_{j+1}: φ_1 = φ₁/ĥ − 1, φ_{k+1} = φ_k/ĥ − 1/(k+1)!   (j = 1…p)
    R = (r_k^{j−1}) with r_p = 1

    UniP-p:  x_t = (σ_t/σ_s0) x_s0 − α_t φ₁ m_s0 − α_t B(h) Σ_k ρᵖ_k D_k     (x̂₀ form; ε̂ form: α ↔ σ)
             ρᵖ = ½ for p = 2, else solve(R[:-1, :-1], b[:-1])
    UniC-p:  x_t^c = (σ_t/σ_s0) x_s0 − α_t φ₁ m_s0 − α_t B(h) (Σ_k ρᶜ_k D_k + ρᶜ_p (m_t − m_s0))
             ρᶜ = ½ for p = 1, else solve(R, b)

Step i (one network call, m_i at x_i): unless i = 0 or i − 1 is in ``disable_corrector``, correct
x_i ← UniC(x_{i−1}^c, m_{i−1}, …; m_i) with the previous predictor's order; then predict
x_{i+1} = UniP(x_i^c, m_i, m_{i−1}, …) with order min(solver_order, i + 1, N − i if lower_order_final).
The history h_i = (x_{i−1}^c, m_{i−1}, m_{i−2}, …) makes it a step map (x_{i+1}, h_{i+1}) = Φ_i(x_i, h_i).
Coefficients are computed in float64 from the grid (diffusers computes them in the sigmas' float32).
Where the last step lands on σ = 0, ``predict_x0=False``, ``solver_type="bh1"`` and ``lower_order_final=False``
are undefined (diffusers returns NaN or inf) and refused.
"""

from __future__ import annotations

import numpy as np

from .grid import TimeGrid
from .model import Denoiser
from .solvers import History, Solver

UNIPC_DEFAULTS = {"solver_order": 2, "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
                  "disable_corrector": ()}


def unipc_options(scheduler) -> dict:
    """The UniPC settings of a configured UniPCMultistepScheduler (the defaults for anything else)."""
    config = getattr(scheduler, "config", None)
    if type(scheduler).__name__ != "UniPCMultistepScheduler" or config is None:
        return dict(UNIPC_DEFAULTS)
    if getattr(scheduler, "solver_p", None) is not None:
        raise ValueError("UniPCMultistepScheduler with solver_p (another scheduler as predictor) has no engine "
                         "twin; drop solver_p")
    options = {k: getattr(config, k, v) for k, v in UNIPC_DEFAULTS.items()}
    options["disable_corrector"] = tuple(options["disable_corrector"] or ())
    return options


def _coefficients(h: float, rks: list[float], order: int, predict_x0: bool, solver_type: str):
    """(φ₁, B(h), R, b) of a UniP/UniC update of ``order`` with the ratios ``rks`` (r_p = 1 appended)."""
    hh = -h if predict_x0 else h
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h_phi_1 = float(np.expm1(hh))
        b_h = hh if solver_type == "bh1" else h_phi_1
        h_phi_k = h_phi_1 / hh - 1.0
        r = np.array([*rks, 1.0])
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(r ** (i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, np.array(rows), np.array(b)


class UniPC(Solver):
    name, order = "unipc", 2

    def __init__(self, denoiser: Denoiser, grid: TimeGrid, options: dict | None = None):
        super().__init__(denoiser, grid)
        o = {**UNIPC_DEFAULTS, **(options or {})}
        if o["solver_type"] not in ("bh1", "bh2"):
            raise ValueError(f"UniPC solver_type must be 'bh1' or 'bh2', got {o['solver_type']!r}")
        self.solver_order, self.predict_x0 = int(o["solver_order"]), bool(o["predict_x0"])
        self.solver_type, self.lower_order_final = o["solver_type"], bool(o["lower_order_final"])
        self.disable_corrector = frozenset(int(k) for k in o["disable_corrector"])
        self.order = self.solver_order
        undefined = [why for why, bad in (("predict_x0=False", not self.predict_x0), ("solver_type='bh1'", self.solver_type == "bh1"),
                                          ("lower_order_final=False", not self.lower_order_final and self.solver_order > 1)) if bad]
        if grid.ends_clean and undefined:
            raise ValueError(f"UniPC with {', '.join(undefined)} is undefined on a last step to σ = 0 (diffusers' "
                             "scheduler returns NaN or inf there): use final_sigmas_type='sigma_min' or the default "
                             "configuration (predict_x0=True, solver_type='bh2', lower_order_final=True)")

    def step_order(self, i: int) -> int:
        """The predictor's order at step i (diffusers' warm-up and ``lower_order_final``)."""
        order = min(self.solver_order, self.num_steps - i) if self.lower_order_final else self.solver_order
        return max(1, min(order, i + 1))

    def _estimate(self, i, x, cond, uncond):
        eps, x0 = self.predict(i, x, cond, uncond)
        return x0 if self.predict_x0 else eps

    def _update(self, target: int, source: int, x, m_source, older, m_target=None):
        """UniP (``m_target`` None) or UniC from point ``source`` to ``target``; ``older`` = [(point, m), …]."""
        g = self.grid
        lam_t, lam_s = g.lam_at(target), g.lam_at(source)
        h = lam_t - lam_s
        rks = [(g.lam_at(k) - lam_s) / h for k, _ in older]
        diffs = [(m - m_source) / float(r) for (_, m), r in zip(older, rks)]
        order = len(older) + 1
        h_phi_1, b_h, rows, b = _coefficients(h, rks, order, self.predict_x0, self.solver_type)
        a_t, s_t, a_s, s_s = g.alpha_at(target), g.sigma_at(target), g.alpha_at(source), g.sigma_at(source)
        scale, lead = (s_t / s_s, a_t) if self.predict_x0 else (a_t / a_s, s_t)
        out = scale * x - lead * h_phi_1 * m_source
        if m_target is None:
            if diffs:
                rhos = [0.5] if order == 2 else list(np.linalg.solve(rows[:-1, :-1], b[:-1]))
                out = out - lead * b_h * sum(float(r) * d for r, d in zip(rhos, diffs))
            return out
        rhos = [0.5] if order == 1 else list(np.linalg.solve(rows, b))
        res = float(rhos[-1]) * (m_target - m_source)
        for r, d in zip(rhos[:-1], diffs):
            res = res + float(r) * d
        return out - lead * b_h * res

    def step(self, i, x, hist: History, cond, uncond):
        m = self._estimate(i, x, cond, uncond)
        if hist:
            last, previous = hist[0], list(hist[1:])  # x_{i−1}^c and m_{i−1}, m_{i−2}, …
            if i - 1 not in self.disable_corrector:
                p = self.step_order(i - 1)
                older = [(i - 1 - k, previous[k]) for k in range(1, p)]
                x = self._update(i, i - 1, last, previous[0], older, m_target=m)
            kept = [m, *previous][: self.solver_order]
        else:
            kept = [m]
        p = min(self.step_order(i), len(kept))  # (a step run without its history, as the continuous adjoint's last)
        older = [(i - k, kept[k]) for k in range(1, p)]
        x_next = self._update(i + 1, i, x, m, older)
        return x_next, (x, *kept)


__all__ = ["UNIPC_DEFAULTS", "UniPC", "unipc_options"]
