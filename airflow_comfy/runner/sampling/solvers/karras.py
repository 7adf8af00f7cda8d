"""Deterministic solvers of the probability-flow ODE ``dx/dσ = (x − D(x; σ))/σ`` in σ (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364): Euler, Heun, and the
DPM-Solver-2-style midpoint method.

The tensor operations and their order match k-diffusion's (MIT, Katherine Crowson) so that the results are
bit-identical to ComfyUI's given the same denoiser.
"""

from __future__ import annotations

import torch

from airflow_comfy.runner.sampling.solvers.common import (
    Callback,
    DenoiseFn,
    NoiseSampler,
    denoise_at,
    ode_slope,
    report,
)


@torch.no_grad()
def sample_euler(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler steps (EDM Algorithm 2 without churn): ``x += (σ_next − σ)·(x − D)/σ``."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        slope = ode_slope(x, sigma, denoised)
        report(callback, i, x, denoised)
        x = x + slope * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_heun(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Heun's second-order method (EDM Algorithm 1 without churn): an Euler trial step, then the average of the
    slopes at both ends; a plain Euler step to σ = 0 (where the slope is undefined)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        slope = ode_slope(x, sigma, denoised)
        report(callback, i, x, denoised)
        step = sigma_next - sigma
        if sigma_next == 0:
            x = x + slope * step
            continue
        x_trial = x + slope * step
        slope_end = ode_slope(x_trial, sigma_next, denoise_at(denoise_fn, x_trial, sigma_next))
        x = x + (slope + slope_end) / 2 * step
    return x


def geometric_midpoint(sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``√(σ·target)``, computed as the midpoint of the logs."""
    return sigma.log().lerp(target.log(), 0.5).exp()


def midpoint_move(denoise_fn: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor,
                  slope: torch.Tensor) -> torch.Tensor:
    """x moved from σ to ``target`` with the slope evaluated at their geometric midpoint (reached by an Euler
    half step): the second-order DPM-Solver-2 update (Lu et al. 2022, arXiv:2206.00927) written in σ, as
    Karras et al. 2022 use it."""
    sigma_mid = geometric_midpoint(sigma, target)
    x_mid = x + slope * (sigma_mid - sigma)
    slope_mid = ode_slope(x_mid, sigma_mid, denoise_at(denoise_fn, x_mid, sigma_mid))
    return x + slope_mid * (target - sigma)


@torch.no_grad()
def sample_dpm_2(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """The midpoint method of :func:`midpoint_move` per step; a plain Euler step to σ = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        slope = ode_slope(x, sigma, denoised)
        report(callback, i, x, denoised)
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
        else:
            x = midpoint_move(denoise_fn, x, sigma, sigma_next, slope)
    return x


__all__ = ["geometric_midpoint", "midpoint_move", "sample_dpm_2", "sample_euler", "sample_heun"]
