"""Linear multistep (Adams–Bashforth with variable steps) on the probability-flow ODE in σ, as k-diffusion's
``lms`` sampler defines it: the step integrates the Lagrange polynomial through the last ``order`` slopes.

Bit for bit ComfyUI 0.3.64's design (k-diffusion's, MIT, Katherine Crowson): the coefficients are the integrals
of the Lagrange basis that ``scipy.integrate.quad`` returns with ``epsrel=1e-4``, the basis evaluated on the
schedule as the same NumPy array (``sigmas.cpu().numpy()``, float32) with the same operations in the same
order, so NumPy's scalar rules give the same bits (NumPy 2 computes the basis in float32: NEP 50); the update's
tensor operations are k-diffusion's, in its order. scipy is imported here, when lms runs, not before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from airflow_comfy.runner.sampling.solvers.common import (
    Callback,
    DenoiseFn,
    NoiseSampler,
    denoise_at,
    ode_slope,
    report,
)


def lms_coefficient(order: int, t: Sequence[float], i: int, j: int) -> float:
    """∫_{t[i]}^{t[i+1]} ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j through t[i], t[i−1], …, t[i−order+1]
    (ℓ_j = 1 at t[i−j], 0 at the others), by ``scipy.integrate.quad(epsrel=1e-4)`` as ComfyUI computes it.

    ``t`` is used as given: ComfyUI passes the schedule as a float32 NumPy array, and so does
    :func:`sample_lms`, because the basis's arithmetic (hence the coefficient's last bits) follows its type."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    from scipy import integrate

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
               noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
               order: int = 4) -> torch.Tensor:
    """``x += Σ_j c_j·slope_{i−j}`` over the last ``min(i + 1, order)`` slopes, ``c_j`` from
    :func:`lms_coefficient`; the last step to σ = 0 returns the denoised estimate."""
    times = sigmas.detach().cpu().numpy()
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
