"""Ancestral samplers: each step moves deterministically down to ``σ_down`` and then adds fresh noise of
standard deviation ``σ_up`` (:func:`~.common.ancestral_split`; eta = 1 gives the DDPM posterior variance of
Ho et al. 2020). The move is an Euler step or the DPM-Solver-2 midpoint step of Karras et al. 2022.

The tensor operations and their order match k-diffusion's (MIT, Katherine Crowson) so that, with the same
noise (:class:`~..noise.SeededGaussianNoise`), the results are bit-identical to ComfyUI's.
"""

from __future__ import annotations

import torch

from airflow_comfy.runner.sampling.solvers.common import (
    Callback,
    DenoiseFn,
    NoiseSampler,
    ancestral_split,
    denoise_at,
    draw_noise,
    ode_slope,
    report,
)
from airflow_comfy.runner.sampling.solvers.karras import midpoint_move


@torch.no_grad()
def sample_euler_ancestral(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None) -> torch.Tensor:
    """An Euler step down to σ_down plus noise of std σ_up; the denoised value where σ_down = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
        report(callback, i, x, denoised)
        if sigma_down == 0:
            x = denoised
            continue
        moved = x + ode_slope(x, sigma, denoised) * (sigma_down - sigma)
        x = moved + draw_noise(noise_sampler, x, sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None) -> torch.Tensor:
    """The DPM-2 midpoint step down to σ_down plus noise of std σ_up; an Euler step where σ_down = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
        report(callback, i, x, denoised)
        slope = ode_slope(x, sigma, denoised)
        if sigma_down == 0:
            x = x + slope * (sigma_down - sigma)
            continue
        x = midpoint_move(denoise_fn, x, sigma, sigma_down, slope)
        x = x + draw_noise(noise_sampler, x, sigma, sigma_next) * sigma_up
    return x


__all__ = ["sample_dpm_2_ancestral", "sample_euler_ancestral"]
