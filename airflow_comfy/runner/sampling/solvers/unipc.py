"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", arXiv:2302.04867): multistep predictor-corrector with data prediction, run as ComfyUI runs it, in the
variance-preserving view of the VE schedule (α = 1/√(1+σ²)), with the final σ = 0 replaced by 0.001.

Bit for bit ComfyUI 0.3.64's ``uni_pc`` / ``uni_pc_bh2`` as its KSampler runs them (the authors' multistep
B(h) solver, https://github.com/wl-zhao/UniPC, MIT, with data prediction, order min(3, steps − 1), lower orders
on the final steps, no corrector after the last): the same tensor operations in the same order, checked against
a reference written from the authors' implementation in ``tests/test_sampling.py``. The noise scaling before and
the inverse scaling after are KSampler's, shared with every sampler (:mod:`..ksampler`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from airflow_comfy.runner.sampling.solvers.common import Callback, DenoiseFn, NoiseSampler


class _VPView:
    """The VE σ seen as a variance-preserving process: α = 1/√(1+σ²), std = σ/√(1+σ²), λ = log(α/std) = −log σ."""

    @staticmethod
    def log_alpha(sigma: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.log(1 / ((sigma * sigma) + 1))

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(sigma))

    def std(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(sigma)))

    def lam(self, sigma: torch.Tensor) -> torch.Tensor:
        log_alpha = self.log_alpha(sigma)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


PredictX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _order_system(ratios: torch.Tensor, neg_h: torch.Tensor, order: int, variant: str):
    """UniPC's order conditions (Zhao et al. 2023, Theorem 3.1 / Algorithm 2): ``rows[k] = r^k`` and
    ``rhs[k] = k!·h·φ_{k+1}(−h)/B(h)`` for k < order (φ the exponential-integrator functions, computed by the
    recurrence ``φ_{k+1}(z) = (φ_k(z) − 1/k!)/z``); also returns ``h·φ₁ = e^(−h) − 1`` and ``B(h)``, which is
    ``−h`` ("bh1") or ``e^(−h) − 1`` ("bh2")."""
    h_phi_1 = torch.expm1(neg_h)
    phi_term = h_phi_1 / neg_h - 1
    b_h = neg_h if variant == "bh1" else torch.expm1(neg_h)
    factorial = 1
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append(torch.pow(ratios, k - 1))
        rhs.append(phi_term * factorial / b_h)
        factorial *= k + 1
        phi_term = phi_term / neg_h - 1 / factorial
    return torch.stack(rows), [float(v) for v in rhs], h_phi_1, b_h


def _unipc_step(predict_x0: PredictX0, vp: _VPView, x: torch.Tensor, x0_history: list[torch.Tensor],
                t_history: list[torch.Tensor], t: torch.Tensor, order: int, variant: str, correct: bool):
    """One step of UniPC with data prediction to time ``t`` (Zhao et al. 2023, Algorithm 2, "UniPC-p" with B(h)).

    Predictor (UniP-p): ``x̃ = (std_t/std_0)·x − α_t·(e^(−h) − 1)·x̂₀ − α_t·B(h)·Σ_k ρ^p_k·Δ_k`` with the
    divided differences ``Δ_k = (x̂₀_{−k} − x̂₀)/r_k``, ``r_k = (λ_{−k} − λ_0)/h``. Corrector (UniC-p): the
    same with ``ρ^c`` solving the full order-p system and the new model evaluation at x̃. Returns the new x and
    (with the corrector) the model's data prediction at x̃."""
    t_last, x0_last = t_history[-1], x0_history[-1]
    lam_last = vp.lam(t_last)
    h = vp.lam(t) - lam_last
    ratios, differences = [], []
    for k in range(1, order):
        ratio = ((vp.lam(t_history[-(k + 1)]) - lam_last) / h)[0]
        ratios.append(ratio)
        differences.append((x0_history[-(k + 1)] - x0_last) / ratio)
    ratio_row = torch.tensor([float(r) for r in ratios] + [1.0], dtype=torch.float32, device=x.device)
    rows, rhs, h_phi_1, b_h = _order_system(ratio_row, -h[0], order, variant)
    rhs_t = torch.tensor(rhs, dtype=torch.float32, device=x.device)

    def per_item(v: torch.Tensor) -> torch.Tensor:
        return v[(...,) + (None,) * (x.dim() - 1)]

    def weighted(weights: torch.Tensor | None) -> torch.Tensor | int:
        return torch.einsum("k,bk...->b...", weights, torch.stack(differences, dim=1)) if differences else 0

    predictor_weights = None
    if differences:
        predictor_weights = torch.tensor([0.5], device=x.device) if order == 2 else \
            torch.linalg.solve(rows[:-1, :-1], rhs_t[:-1])
    alpha_t = torch.exp(vp.log_alpha(t))
    x_linear = per_item(vp.std(t) / vp.std(t_last)) * x - per_item(alpha_t * h_phi_1) * x0_last
    x_new = x_linear - per_item(alpha_t * b_h) * weighted(predictor_weights)
    if not correct:
        return x_new, None
    corrector_weights = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(rows, rhs_t)
    x0_new = predict_x0(x_new, t)
    correction = weighted(corrector_weights[:-1]) + corrector_weights[-1] * (x0_new - x0_last)
    return x_linear - per_item(alpha_t * b_h) * correction, x0_new


@torch.no_grad()
def _sample_unipc(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, variant: str,
                  callback: Callback | None) -> torch.Tensor:
    """Multistep UniPC (order min(3, steps − 1), lower order on the final steps) in the VP parametrisation of
    the same schedule, as ComfyUI runs it: a final σ = 0 is replaced by 0.001 and the result rescaled by
    1/α(σ_last). A single step has order 0 there: the model is evaluated once and the starting latent comes
    back (rescaled), unsampled; so it does here, to give ComfyUI's pixels."""
    vp = _VPView()
    times = sigmas.clone()
    if times[-1] == 0:
        times[-1] = 0.001
    steps = len(times) - 1
    if steps < 1:
        return x
    order = min(3, steps - 1)
    batch = x.shape[0]

    def predict_x0(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # ε from the VE denoiser, then the data prediction x0 = (x − std·ε)/α (Lu et al. 2022, eq. 9).
        sigma = t.view(t.shape[:1] + (1,) * (x_vp.ndim - 1))
        x_ve = x_vp * ((sigma ** 2 + 1.0) ** 0.5)
        eps = (x_ve - denoise_fn(x_ve, t)) / sigma
        return (x_vp - vp.std(sigma) * eps) / vp.alpha(sigma)

    def report(i: int, x_vp: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> None:
        if callback is not None:
            callback(i, x_vp / vp.alpha(t[0]), x0)

    x = x / torch.sqrt(1.0 + times[0] ** 2.0)
    t = times[0].expand(batch)
    x0_history, t_history = [predict_x0(x, t)], [t]
    report(0, x, t, x0_history[-1])
    if order == 0:
        return x / vp.alpha(times[-1])
    for step in range(1, order):  # warm-up at orders 1 .. order − 1
        t = times[step].expand(batch)
        x, x0 = _unipc_step(predict_x0, vp, x, x0_history, t_history, t, step, variant, True)
        t_history.append(t)
        x0_history.append(x0)
        if step < steps:
            report(step, x, t, x0)
    for step in range(order, steps + 1):
        t = times[step].expand(batch)
        last = step == steps  # no model evaluation after the final step
        x, x0 = _unipc_step(predict_x0, vp, x, x0_history, t_history, t, min(order, steps + 1 - step), variant,
                            not last)
        t_history = t_history[1:] + [t]
        if not last:
            x0_history = x0_history[1:] + [x0]
            report(step, x, t, x0)
    return x / vp.alpha(times[-1])


def sample_uni_pc(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                  noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """UniPC with B(h) = h ("bh1")."""
    return _sample_unipc(denoise_fn, x, sigmas, "bh1", callback)


def sample_uni_pc_bh2(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                      noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """UniPC with B(h) = e^h − 1 ("bh2")."""
    return _sample_unipc(denoise_fn, x, sigmas, "bh2", callback)


__all__ = ["sample_uni_pc", "sample_uni_pc_bh2"]
