"""Linear multistep (Adams–Bashforth with variable steps) on the probability-flow ODE in σ, as k-diffusion's
``lms`` sampler defines it: the step integrates the Lagrange polynomial through the last ``order`` slopes.

The update's tensor operations and their order match k-diffusion's (MIT, Katherine Crowson); its coefficients
are computed here by exact Gauss–Legendre quadrature, where ComfyUI calls ``scipy.integrate.quad``, so a
coefficient may differ from ComfyUI's in its last bits.
"""

from __future__ import annotations

import math

import torch

from airflow_comfy.runner.sampling.solvers.common import (
    Callback,
    DenoiseFn,
    NoiseSampler,
    denoise_at,
    ode_slope,
    report,
)

_GL4_NODES = (
    -math.sqrt(3 / 7 + 2 / 7 * math.sqrt(6 / 5)),
    -math.sqrt(3 / 7 - 2 / 7 * math.sqrt(6 / 5)),
    math.sqrt(3 / 7 - 2 / 7 * math.sqrt(6 / 5)),
    math.sqrt(3 / 7 + 2 / 7 * math.sqrt(6 / 5)),
)
_GL4_WEIGHTS = (
    (18 - math.sqrt(30)) / 36,
    (18 + math.sqrt(30)) / 36,
    (18 + math.sqrt(30)) / 36,
    (18 - math.sqrt(30)) / 36,
)


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """∫_{t[i]}^{t[i+1]} ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j through t[i], t[i−1], …, t[i−order+1]
    (ℓ_j = 1 at t[i−j], 0 at the others). ℓ_j has degree order−1 <= 3, so 4-point Gauss–Legendre quadrature
    integrates it exactly (exact up to degree 7)."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    a, b = t[i], t[i + 1]
    half, centre = 0.5 * (b - a), 0.5 * (a + b)
    return half * sum(w * basis(centre + half * node) for node, w in zip(_GL4_NODES, _GL4_WEIGHTS, strict=True))


@torch.no_grad()
def sample_lms(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
               noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
               order: int = 4) -> torch.Tensor:
    """``x += Σ_j c_j·slope_{i−j}`` over the last ``min(i + 1, order)`` slopes, ``c_j`` from
    :func:`lms_coefficient`; the last step to σ = 0 returns the denoised estimate."""
    times = [float(s) for s in sigmas.detach().cpu()]
    history: list[torch.Tensor] = []  # the most recent slopes, oldest first
    for i in range(len(sigmas) - 1):
        denoised = denoise_at(denoise_fn, x, sigmas[i])
        history = (history + [ode_slope(x, sigmas[i], denoised)])[-order:]
        report(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        used = min(i + 1, order)
        coefficients = [lms_coefficient(used, times, i, j) for j in range(used)]
        x = x + sum(c * slope for c, slope in zip(coefficients, reversed(history), strict=True))
    return x


__all__ = ["lms_coefficient", "sample_lms"]
