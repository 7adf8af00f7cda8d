"""What the solvers share: their calling convention and a few small formulas.

Every solver has the signature ``solve(denoise_fn, x, sigmas, *, noise_sampler=None, callback=None) -> x``:

* ``denoise_fn(x, sigma)`` is the denoiser ``D(x; σ)`` of the variance-exploding formulation of Karras et al.
  2022 (EDM): ``x`` is the noisy latent at noise level σ (``x = x₀ + σ·ε``), ``sigma`` a ``Tensor[B]``; it
  returns the estimate of ``x₀``. The probability-flow ODE is ``dx/dσ = (x − D(x; σ))/σ``.
* ``sigmas`` is the descending schedule (float32, usually ending in 0); ``len(sigmas) − 1`` steps are taken.
* ``noise_sampler(σ, σ_next) -> Tensor like x`` gives the standard-normal noise of the stochastic solvers
  (:mod:`..noise`); deterministic solvers ignore it, stochastic ones fall back to ``randn_like`` without one.
* ``callback(i, x, denoised)`` is called once per step, after the step's first model evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
SamplerFn = Callable[..., torch.Tensor]


def denoise_at(denoise_fn: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``D(x; σ)`` with σ repeated over the batch."""
    return denoise_fn(x, sigma * x.new_ones([x.shape[0]]))


def report(callback: Callback | None, step: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(step, x, denoised)


def per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``v`` with trailing singleton dimensions up to ``ndim`` (a per-batch-item scalar that broadcasts)."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def ode_slope(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative ``dx/dσ = (x − D)/σ`` (EDM eq. 3 with σ(t) = t)."""
    return (x - denoised) / per_sample(sigma, x.ndim)


def ancestral_split(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split the step σ → σ_next of an ancestral sampler into a deterministic move down to ``σ_down`` and
    fresh noise of standard deviation ``σ_up``, with ``σ_down² + σ_up² = σ_next²``. For eta = 1, σ_up² is the
    variance of the DDPM posterior ``q(x_next | x, x₀)`` (Ho et al. 2020) in σ units:
    ``σ_next²·(σ² − σ_next²)/σ²``; eta scales its square root (capped at σ_next); eta = 0 is the ODE."""
    if not eta:
        return sigma_next, 0.0
    next_var = sigma_next ** 2
    sigma_up = min(sigma_next, eta * (next_var * (sigma ** 2 - next_var) / sigma ** 2) ** 0.5)
    sigma_down = (next_var - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def draw_noise(noise_sampler: NoiseSampler | None, x: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """Standard-normal noise for the step σ → σ_next (unseeded ``randn_like`` without a sampler)."""
    if noise_sampler is None:
        return torch.randn_like(x)
    return noise_sampler(sigma, sigma_next)


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(α/σ) of the DPM-Solver papers; with the VE parametrisation (α = 1) it is ``−log σ``."""
    return sigma.log().neg()


def sigma_at(lam: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`half_log_snr`: ``σ = e^(−λ)``."""
    return lam.neg().exp()
