"""DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", arXiv:2211.01095): exponential integrators of the diffusion ODE/SDE for the data prediction
``x̂₀ = D(x; σ)``, in the half-log-SNR ``λ = log(α/σ)``, which is ``−log σ`` in the VE parametrisation
(α = 1) that :func:`~.common.half_log_snr` uses.

* ``dpmpp_2m`` — the multistep second-order ODE solver (Algorithm 2);
* ``dpmpp_sde`` — a two-stage stochastic solver: the 2S step with its intermediate point at ``λ + r·h``, each
  stage an exponential-integrator move to a reduced σ_down plus noise of std σ_up (ancestral sampling,
  :func:`~.common.ancestral_split`);
* ``dpmpp_2m_sde`` — the multistep second-order SDE solver (section 4; midpoint form of the correction).

The tensor operations and their order are ComfyUI 0.3.64's (its adaptation of k-diffusion, MIT, Katherine
Crowson, which writes the SDE solvers with the signal scale α = σ·e^λ explicit), so that with the same denoiser
and noise (:class:`~..noise.BrownianIncrementNoise` for the SDE solvers) the results are bit-identical.
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
    half_log_snr,
    report,
    sigma_at,
)


def _exponential_step(x: torch.Tensor, lam: torch.Tensor, lam_next: torch.Tensor,
                      prediction: torch.Tensor) -> torch.Tensor:
    """The ODE from λ to λ_next with the data prediction held constant (first-order DPM-Solver++, eq. 5 with
    α = 1): ``x_next = (σ_next/σ)·x − (e^(−h) − 1)·x̂₀``, h = λ_next − λ."""
    h = lam_next - lam
    return (sigma_at(lam_next) / sigma_at(lam)) * x - (-h).expm1() * prediction


@torch.no_grad()
def sample_dpmpp_2m(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                    noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): the first-order step with the prediction extrapolated from the last two,
    ``(1 + 1/2r)·x̂₀ − (1/2r)·x̂₀_prev`` with r = h_prev/h; first order on the first step and on the last step
    to σ = 0."""
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # λ and x̂₀ of the previous step
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        report(callback, i, x, denoised)
        lam, lam_next = half_log_snr(sigma), half_log_snr(sigma_next)
        prediction = denoised
        if previous is not None and sigma_next != 0:
            lam_prev, denoised_prev = previous
            weight = 1 / (2 * ((lam - lam_prev) / (lam_next - lam)))
            prediction = (1 + weight) * denoised - weight * denoised_prev
        x = _exponential_step(x, lam, lam_next, prediction)
        previous = (lam, denoised)
    return x


def _ancestral_stage(x: torch.Tensor, sigma: torch.Tensor, lam: torch.Tensor, sigma_to: torch.Tensor,
                     lam_to: torch.Tensor, prediction: torch.Tensor, eta: float,
                     noise_sampler: NoiseSampler | None) -> torch.Tensor:
    """One stage of ``dpmpp_sde``: split σ → σ_to into σ_down and σ_up (in the scaled σ = e^(−λ)), move x to
    σ_down with the exponential integrator for the data prediction, then add noise of std σ_up (both scaled by
    the signal level α_to = σ_to·e^λ_to)."""
    alpha = sigma * lam.exp()
    alpha_to = sigma_to * lam_to.exp()
    sigma_down, sigma_up = ancestral_split(sigma_at(lam), sigma_at(lam_to), eta)
    h_down = half_log_snr(sigma_down) - lam
    x = (alpha_to / alpha) * (-h_down).exp() * x - alpha_to * (-h_down).expm1() * prediction
    if eta > 0:
        x = x + alpha_to * draw_noise(noise_sampler, x, sigma, sigma_to) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                     noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                     eta: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """Stochastic DPM-Solver++ in two stages per step: a stage to the intermediate σ at λ + r·h with x̂₀, a
    model evaluation there, and a stage over the whole step with ``(1 − 1/2r)·x̂₀ + (1/2r)·x̂₀_mid``; the
    denoised value on the last step to σ = 0. Noise is queried for (σ, σ_mid) and then (σ, σ_next)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        report(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lam, lam_next = half_log_snr(sigma), half_log_snr(sigma_next)
        lam_mid = lam + r * (lam_next - lam)
        sigma_mid = sigma_at(lam_mid)
        x_mid = _ancestral_stage(x, sigma, lam, sigma_mid, lam_mid, denoised, eta, noise_sampler)
        denoised_mid = denoise_at(denoise_fn, x_mid, sigma_mid)
        weight = 1 / (2 * r)
        prediction = (1 - weight) * denoised + weight * denoised_mid
        x = _ancestral_stage(x, sigma, lam, sigma_next, lam_next, prediction, eta, noise_sampler)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint form: with h = λ_next − λ and α_next = σ_next·e^λ_next, the linear part
    ``σ_next/σ·e^(−ηh)·x + α_next·(1 − e^(−(1+η)h))·x̂₀``, the correction
    ``½·α_next·(1 − e^(−(1+η)h))·(x̂₀ − x̂₀_prev)/r`` (r = h_prev/h) from the second step on, and noise of std
    ``σ_next·√(1 − e^(−2ηh))``; the denoised value on the last step to σ = 0."""
    denoised_prev: torch.Tensor | None = None
    h_prev: torch.Tensor | None = None
    h: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(denoise_fn, x, sigma)
        report(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lam, lam_next = half_log_snr(sigma), half_log_snr(sigma_next)
            h = lam_next - lam
            alpha_next = sigma_next * lam_next.exp()
            kept = (-(h * (eta + 1))).expm1().neg()  # 1 − e^(−(1+η)h)
            x = sigma_next / sigma * (-h * eta).exp() * x + alpha_next * kept * denoised
            if denoised_prev is not None:
                x = x + 0.5 * alpha_next * kept * (1 / (h_prev / h)) * (denoised - denoised_prev)
            if eta > 0:
                noise = draw_noise(noise_sampler, x, sigma, sigma_next)
                x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt()
        denoised_prev, h_prev = denoised, h
    return x


__all__ = ["sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_sde"]
