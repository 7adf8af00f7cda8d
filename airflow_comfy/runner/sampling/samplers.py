"""ODE/SDE solvers over a σ schedule, written from the papers.

Every sampler has the signature ``fn(denoise_fn, x, sigmas, *, noise_sampler=None, callback=None) -> x``:

* ``denoise_fn(x, sigma)`` is the denoiser ``D(x; σ)`` of the variance-exploding ("VE") formulation of
  Karras et al. 2022 (EDM): ``x`` is the noisy latent at noise level σ (``x = x₀ + σ·ε``), ``sigma`` a
  ``Tensor[B]``; it returns the estimate of ``x₀``. The probability-flow ODE is ``dx/dσ = (x − D(x; σ))/σ``.
* ``sigmas`` is the descending schedule (float32, usually ending in 0); ``len(sigmas) − 1`` steps are taken.
* ``noise_sampler(σ, σ_next) -> Tensor like x`` gives the fresh standard-normal noise of stochastic samplers
  (see :func:`noise_sampler_for`); deterministic samplers ignore it.
* ``callback(i, x, denoised)`` is called once per step after the first model evaluation of that step.

Which of them reproduce ComfyUI bit for bit (same arithmetic, same noise stream) is summarised in
:data:`COMFY_EXACT`: the ODE samplers, and on the CPU the ancestral and SDE samplers; ``dpmpp_sde`` /
``dpmpp_2m_sde`` draw their noise from torchsde's Brownian tree as ComfyUI 0.3.64 does
(:class:`~.noise.BrownianIncrementNoise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from airflow_comfy.runner.sampling.noise import BrownianIncrementNoise, SeededGaussianNoise

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dσ = (x − D)/σ (EDM eq. 3 with σ(t) = t)."""
    return (x - denoised) / _append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Split the step σ_from → σ_to of an ancestral sampler into a deterministic step down to σ_down and fresh
    noise of standard deviation σ_up, with σ_down² + σ_up² = σ_to² (DDPM posterior variance for eta = 1)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _noise(noise_sampler: NoiseSampler | None, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    if noise_sampler is None:
        return torch.randn_like(x)
    return noise_sampler(sigma, sigma_next)


# ---------------------------------------------------------------------------------------------------------------
# ODE samplers


@torch.no_grad()
def sample_euler(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        x = x + d * dt
    return x


@torch.no_grad()
def sample_heun(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler on the last step to σ = 0."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = denoise_fn(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


@torch.no_grad()
def sample_dpm_2(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver-2 style midpoint method: evaluate at the geometric mean of σ and σ_next, step with that
    slope (Lu et al. 2022 in the σ parametrisation of Karras et al. 2022); Euler on the last step."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            dt = sigmas[i + 1] - sigmas[i]
            x = x + d * dt
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            dt_1 = sigma_mid - sigmas[i]
            dt_2 = sigmas[i + 1] - sigmas[i]
            x_2 = x + d * dt_1
            denoised_2 = denoise_fn(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
    return x


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
    """Linear multistep (Adams–Bashforth in σ with variable steps): x += Σ_j c_j·d_{i−j}, c_j the integral of the
    Lagrange basis polynomials over the step; the last step to σ = 0 returns the denoised estimate."""
    s_in = x.new_ones([x.shape[0]])
    t = [float(s) for s in sigmas.detach().cpu()]
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur_order = min(i + 1, order)
            coeffs = [lms_coefficient(cur_order, t, i, j) for j in range(cur_order)]
            x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds), strict=True))
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                    noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) with λ = −log σ: a multistep data-prediction solver,
    first order on its first step and on the last step to σ = 0."""
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        if callback is not None:
            callback(i, x, denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------------------------------------------------
# Ancestral samplers (eta = 1, s_noise = 1)


@torch.no_grad()
def sample_euler_ancestral(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None) -> torch.Tensor:
    """Euler step down to σ_down, then fresh noise of std σ_up (ancestral sampling, eta = 1)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, x, denoised)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt + _noise(noise_sampler, x, sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None) -> torch.Tensor:
    """The DPM-2 midpoint step down to σ_down, then fresh noise of std σ_up."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            dt_1 = sigma_mid - sigmas[i]
            dt_2 = sigma_down - sigmas[i]
            x_2 = x + d * dt_1
            denoised_2 = denoise_fn(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
            x = x + _noise(noise_sampler, x, sigmas[i], sigmas[i + 1]) * sigma_up
    return x


# ---------------------------------------------------------------------------------------------------------------
# SDE samplers (Brownian-tree noise)


@torch.no_grad()
def sample_dpmpp_sde(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                     noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                     eta: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ SDE, two stages per step (Lu et al. 2022b, the SDE variant of DPM-Solver++(2S) with the
    intermediate point at λ_s + r·h): each stage is an exponential-integrator step of the data prediction to a
    reduced σ_down plus Brownian noise of std σ_up, both scaled by the signal level α = σ·e^λ (ComfyUI 0.3.64's
    form). The noise is queried for (σ, σ_mid) and (σ, σ_next). Euler (= the denoised value) on the last step to
    σ = 0."""
    if len(sigmas) <= 1:
        return x
    s_in = x.new_ones([x.shape[0]])

    def lam_fn(sigma):
        return sigma.log().neg()

    def sigma_of(lam):
        return lam.neg().exp()

    def stage(x, sigma, lam, sigma_to, lam_to, prediction):
        alpha = sigma * lam.exp()
        alpha_to = sigma_to * lam_to.exp()
        sd, su = get_ancestral_step(sigma_of(lam), sigma_of(lam_to), eta)
        h_down = lam_fn(sd) - lam
        x = (alpha_to / alpha) * (-h_down).exp() * x - alpha_to * (-h_down).expm1() * prediction
        if eta > 0:
            x = x + alpha_to * _noise(noise_sampler, x, sigma, sigma_to) * su
        return x

    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam, lam_next = lam_fn(sigmas[i]), lam_fn(sigmas[i + 1])
        lam_mid = lam + r * (lam_next - lam)
        sigma_mid = sigma_of(lam_mid)
        x_2 = stage(x, sigmas[i], lam, sigma_mid, lam_mid, denoised)
        denoised_2 = denoise_fn(x_2, sigma_mid * s_in)
        fac = 1 / (2 * r)
        x = stage(x, sigmas[i], lam, sigmas[i + 1], lam_next, (1 - fac) * denoised + fac * denoised_2)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022b, arXiv:2211.01095, section 4, the SDE
    solver), in ComfyUI 0.3.64's form: with h = λ_next − λ and α_next = σ_next·e^λ_next, the linear part
    ``σ_next/σ·e^(−ηh)·x + α_next·(1 − e^(−(1+η)h))·D``, plus a first-order correction
    ``½·α_next·(1 − e^(−(1+η)h))·(D − D_prev)/r`` and noise of std ``σ_next·√(1 − e^(−2ηh))``. The last step
    to σ = 0 returns the denoised value."""
    if len(sigmas) <= 1:
        return x
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h = h_last = None
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i] * s_in)
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            h = lam_next - lam
            alpha_next = sigmas[i + 1] * lam_next.exp()
            kept = (-(h * (eta + 1))).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_next * kept * denoised
            if old_denoised is not None:
                x = x + 0.5 * alpha_next * kept * (1 / (h_last / h)) * (denoised - old_denoised)
            if eta > 0:
                x = x + _noise(noise_sampler, x, sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * \
                    (-2 * h * eta).expm1().neg().sqrt()
        old_denoised = denoised
        h_last = h
    return x


# ---------------------------------------------------------------------------------------------------------------
# UniPC


class _VPSchedule:
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


def _unipc_update(model_fn, ns: _VPSchedule, x: torch.Tensor, model_prev: list[torch.Tensor],
                  t_prev: list[torch.Tensor], t: torch.Tensor, order: int, variant: str, use_corrector: bool):
    """One step of UniPC with data prediction (Zhao et al. 2023, Algorithm 2 "UniPC-p" with B(h)).

    Predictor (UniP-p): ``x̃ = (std_t/std_0)·x − α_t·(e^(−h) − 1)·D_0 − α_t·B(h)·Σ_k ρ^p_k·D1_k`` with the
    divided differences ``D1_k = (D_{−k} − D_0)/r_k``, ``r_k = (λ_{−k} − λ_0)/h``. Corrector (UniC-p): the same
    with ``ρ^c`` solving the order-p system and the new model evaluation at x̃. ``B(h) = −h`` (bh1) or
    ``e^(−h) − 1`` (bh2)."""
    dims = x.dim()
    t_prev_0 = t_prev[-1]
    lambda_prev_0 = ns.lam(t_prev_0)
    lambda_t = ns.lam(t)
    model_prev_0 = model_prev[-1]
    sigma_prev_0, sigma_t = ns.std(t_prev_0), ns.std(t)
    alpha_t = torch.exp(ns.log_alpha(t))
    h = lambda_t - lambda_prev_0

    rks = []
    d1s = []
    for i in range(1, order):
        t_prev_i = t_prev[-(i + 1)]
        model_prev_i = model_prev[-(i + 1)]
        lambda_prev_i = ns.lam(t_prev_i)
        rk = ((lambda_prev_i - lambda_prev_0) / h)[0]
        rks.append(rk)
        d1s.append((model_prev_i - model_prev_0) / rk)
    rks_t = torch.tensor([float(r) for r in rks] + [1.0], dtype=torch.float32, device=x.device)

    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    big_r = []
    b = []
    for i in range(1, order + 1):
        big_r.append(torch.pow(rks_t, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    big_r_t = torch.stack(big_r)
    b_t = torch.tensor([float(v) for v in b], dtype=torch.float32, device=x.device)

    d1s_t = None
    rhos_p = None
    if d1s:
        d1s_t = torch.stack(d1s, dim=1)
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else \
            torch.linalg.solve(big_r_t[:-1, :-1], b_t[:-1])
    rhos_c = None
    if use_corrector:
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(big_r_t, b_t)

    def expand(v):
        return v[(...,) + (None,) * (dims - 1)]

    x_t_ = expand(sigma_t / sigma_prev_0) * x - expand(alpha_t * h_phi_1) * model_prev_0
    pred_res = torch.einsum("k,bk...->b...", rhos_p, d1s_t) if d1s_t is not None else 0
    x_t = x_t_ - expand(alpha_t * b_h) * pred_res
    model_t = None
    if use_corrector:
        model_t = model_fn(x_t, t)
        corr_res = torch.einsum("k,bk...->b...", rhos_c[:-1], d1s_t) if d1s_t is not None else 0
        d1_t = model_t - model_prev_0
        x_t = x_t_ - expand(alpha_t * b_h) * (corr_res + rhos_c[-1] * d1_t)
    return x_t, model_t


@torch.no_grad()
def _sample_unipc(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, variant: str,
                  callback: Callback | None) -> torch.Tensor:
    """Multistep UniPC (order min(3, steps − 1), lower order on the final steps) in the VP parametrisation of
    the same schedule, as ComfyUI runs it: a final σ = 0 is replaced by 0.001 and the result rescaled by
    1/α(σ_last). (For a single step ComfyUI's order would be 0 and it would return the scaled noise; this
    takes one first-order step instead.)"""
    ns = _VPSchedule()
    timesteps = sigmas.clone()
    if timesteps[-1] == 0:
        timesteps[-1] = 0.001
    steps = len(timesteps) - 1
    if steps < 1:
        return x
    order = max(1, min(3, len(timesteps) - 2))
    batch = x.shape[0]

    def model_fn(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # ε from the VE denoiser, then the data prediction x0 = (x − std·ε)/α (Lu et al. 2022, eq. 9).
        sigma = t.view(t.shape[:1] + (1,) * (x_vp.ndim - 1))
        x_ve = x_vp * ((sigma ** 2 + 1.0) ** 0.5)
        eps = (x_ve - denoise_fn(x_ve, t)) / sigma
        return (x_vp - ns.std(sigma) * eps) / ns.alpha(sigma)

    def report(i: int, x_vp: torch.Tensor, t: torch.Tensor, denoised: torch.Tensor) -> None:
        if callback is not None:
            callback(i, x_vp / ns.alpha(t[0]), denoised)

    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    vec_t = timesteps[0].expand(batch)
    model_prev = [model_fn(x, vec_t)]
    t_prev = [vec_t]
    report(0, x, vec_t, model_prev[-1])
    # warm-up: orders 1 .. order-1
    for step in range(1, order):
        vec_t = timesteps[step].expand(batch)
        x, model_x = _unipc_update(model_fn, ns, x, model_prev, t_prev, vec_t, step, variant, True)
        if model_x is None:
            model_x = model_fn(x, vec_t)
        t_prev.append(vec_t)
        model_prev.append(model_x)
        if step < steps:
            report(step, x, vec_t, model_x)
    for step in range(order, steps + 1):
        vec_t = timesteps[step].expand(batch)
        step_order = min(order, steps + 1 - step)
        use_corrector = step != steps  # no model evaluation after the final step
        x, model_x = _unipc_update(model_fn, ns, x, model_prev, t_prev, vec_t, step_order, variant, use_corrector)
        for i in range(order - 1):
            t_prev[i] = t_prev[i + 1]
            model_prev[i] = model_prev[i + 1]
        t_prev[-1] = vec_t
        if step < steps:
            if model_x is None:
                model_x = model_fn(x, vec_t)
            model_prev[-1] = model_x
            report(step, x, vec_t, model_x)
    return x / ns.alpha(timesteps[-1])


def sample_uni_pc(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                  noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """UniPC with B(h) = h ("bh1")."""
    return _sample_unipc(denoise_fn, x, sigmas, "bh1", callback)


def sample_uni_pc_bh2(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                      noise_sampler: NoiseSampler | None = None, callback: Callback | None = None) -> torch.Tensor:
    """UniPC with B(h) = e^h − 1 ("bh2")."""
    return _sample_unipc(denoise_fn, x, sigmas, "bh2", callback)


# ---------------------------------------------------------------------------------------------------------------
# Registry

SamplerFn = Callable[..., torch.Tensor]

SAMPLERS: dict[str, SamplerFn] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ddim": sample_euler,  # ComfyUI's ddim is Euler on the given sigmas (+ seed+1 inpaint noise, see ksampler)
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
"""Sampler name -> solver, in ComfyUI's widget order (keys = ``core_nodes.SUPPORTED_SAMPLERS``)."""

ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral"})
"""Per-step noise from one seeded generator on the model device (:class:`~.noise.SeededGaussianNoise`)."""

SDE_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde"})
"""Per-step noise from a seeded ``torchsde.BrownianTree`` on the CPU (:class:`~.noise.BrownianIncrementNoise`)."""

_SAME_OPS = "same tensor operations in the same order as ComfyUI's (bit-identical given the same denoiser)"
_SAME_NOISE_CPU = "; on the CPU the same noise stream (generator seeded with seed + 1), on CUDA the device's RNG"
_SAME_TREE = "; the same torchsde Brownian tree on the CPU (entropy = seed), hence the same noise"
COMFY_EXACT: dict[str, str] = {
    "euler": _SAME_OPS,
    "heun": _SAME_OPS,
    "dpm_2": _SAME_OPS,
    "dpmpp_2m": _SAME_OPS,
    "ddim": _SAME_OPS,
    "lms": "same math; coefficients by exact Gauss-Legendre quadrature instead of scipy.quad (may differ by an ulp)",
    "uni_pc": "same math in the same VP formulation; not checked bit for bit",
    "uni_pc_bh2": "same math in the same VP formulation; not checked bit for bit",
    "euler_ancestral": _SAME_OPS + _SAME_NOISE_CPU,
    "dpm_2_ancestral": _SAME_OPS + _SAME_NOISE_CPU,
    "dpmpp_sde": _SAME_OPS + _SAME_TREE,
    "dpmpp_2m_sde": _SAME_OPS + _SAME_TREE,
}
"""How close each sampler is to ComfyUI 0.3.64 given the same denoiser (for documentation and reports)."""

BIT_EXACT_ON_CPU = frozenset(name for name, how in COMFY_EXACT.items() if how.startswith(_SAME_OPS))
"""The samplers whose CPU results are bit-identical to ComfyUI 0.3.64's given the same denoiser and seed."""


def noise_sampler_for(sampler_name: str, x: torch.Tensor, sigmas: torch.Tensor,
                      seed: int | Sequence[int] | None) -> NoiseSampler | None:
    """The noise source ComfyUI's KSampler gives ``sampler_name`` (None for the deterministic samplers, and for
    an SDE sampler whose schedule has no positive σ, which draws no noise)."""
    if sampler_name in ANCESTRAL_SAMPLERS:
        if isinstance(seed, (list, tuple)):
            raise ValueError(f"{sampler_name} takes one seed, not one per batch item")
        return SeededGaussianNoise(x, seed)
    if sampler_name in SDE_SAMPLERS:
        positive = sigmas[sigmas > 0]
        if positive.numel() == 0:
            return None
        return BrownianIncrementNoise(x, positive.min(), sigmas.max(), seed)
    return None
