"""Discrete SD 1.x / SDXL noise schedule and ComfyUI's sigma schedulers, from the formulas.

The model side (:class:`ModelSampling`): a DDPM trained on 1000 discrete steps with the "scaled linear" beta
schedule (``β_i`` = squares of ``linspace(√0.00085, √0.012, 1000)``), seen as a variance-exploding process
``x_σ = x_0 + σ·ε`` with ``σ_i = √((1 − ᾱ_i)/ᾱ_i)`` (Karras et al. 2022, "EDM", table 1, "VP → VE").
As in ComfyUI 0.3.64 (``comfy/model_sampling.py`` ``ModelSamplingDiscrete``), the betas and σ are computed in
float64 and stored as float32 σ and float32 log σ (the log taken in float64): σ_min = 0.029167,
σ_max = 14.614641.

* ``sigma_to_t`` maps σ to the integer index of the nearest log σ (returned as float): ComfyUI feeds the UNet
  integer timesteps, not fractional ones (``ModelSamplingDiscrete.timestep``).
* ``t_to_sigma`` interpolates log σ linearly between the two neighbouring indices.
* ``calculate_input`` is EDM's ``c_in = 1/√(σ² + σ_data²)`` with σ_data = 1; ``calculate_denoised`` turns an
  ε (or v) prediction into the denoised estimate ``D(x; σ)``.

The schedulers of ComfyUI's ``comfy/samplers.py`` (``SCHEDULER_HANDLERS``; the tests check their 20-step
values against numbers measured on ComfyUI 0.3.64):

========== ==========================================================================================
normal      σ(t) at ``linspace(999, 0, steps)`` (log-linear interpolation), then 0
sgm_uniform σ(t) at ``linspace(999, 0, steps + 1)[:-1]``, then 0
simple      every ``1000/steps``-th entry of the σ table from the top, then 0
ddim_uniform every ``1000//steps``-th entry from index 1 upwards, reversed, then 0 (more than ``steps``
            entries when 1000 is not a multiple of ``steps``, as in ComfyUI)
karras      Karras et al. 2022 eq. 5: ``(σ_max^(1/ρ) + r·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ``, ρ = 7
exponential ``exp(linspace(log σ_max, log σ_min, steps))``, then 0
beta        table entries at ``rint(999·F⁻¹(1 − i/steps))`` for the Beta(0.6, 0.6) quantile function F⁻¹
            (Lee et al. 2024, arXiv:2407.12173), consecutive duplicates dropped, then 0
========== ==========================================================================================

Everything except ``ddim_uniform`` (see above) and ``beta`` (duplicates dropped, rare) returns ``steps + 1``
values ending in 0. No scipy: the Beta quantile is a bisection on the regularized incomplete beta function,
which is evaluated from its power series (see :func:`beta_cdf`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

NUM_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012


class ModelSampling:
    """σ ↔ timestep mapping and input/output scaling of a discrete ε- (or v-) prediction model."""

    def __init__(self, prediction: str = "eps", *, linear_start: float = LINEAR_START,
                 linear_end: float = LINEAR_END, num_timesteps: int = NUM_TIMESTEPS):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.prediction = prediction
        self.sigma_data = 1.0
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas64 = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = sigmas64.float()
        self.log_sigmas = sigmas64.log().float()

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    # -- σ <-> t -------------------------------------------------------------------------------------------------
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest log σ in the table, as float (what the UNet is called with)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device).float()

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """σ at a (fractional) timestep: log σ interpolated linearly between neighbouring indices."""
        t = torch.as_tensor(t).float().to(self.log_sigmas.device)
        t = torch.clamp(t, min=0, max=self.num_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp()

    def percent_to_sigma(self, percent: float) -> float:
        """σ at a fraction of the sampling run (0 = start, σ ≈ ∞; 1 = end, σ = 0), on the timestep axis."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.t_to_sigma(torch.tensor((1.0 - percent) * (self.num_timesteps - 1.0))))

    def sigma_to_percent(self, sigma: torch.Tensor | float) -> float:
        """Rough inverse of :meth:`percent_to_sigma` on the integer timestep (for progress / hooks)."""
        t = float(self.sigma_to_t(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[:1])[0])
        return 1.0 - t / (self.num_timesteps - 1.0)

    # -- model input / output ------------------------------------------------------------------------------------
    @staticmethod
    def _view(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """EDM c_in: ``x / √(σ² + 1)``."""
        sigma = self._view(sigma, x)
        return x / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """D(x; σ) from the network output: ``x − ε·σ`` (eps) or the v-prediction identity."""
        sigma = self._view(sigma, x)
        if self.prediction == "v":
            sd = self.sigma_data
            return x * sd ** 2 / (sigma ** 2 + sd ** 2) - model_output * sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        return x - model_output * sigma

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """Initial x: ``noise·√(1+σ²) + latent`` at full denoise, ``noise·σ + latent`` otherwise (ComfyUI's
        ``EPS.noise_scaling`` in ``comfy/model_sampling.py``)."""
        sigma = self._view(sigma, noise)
        noise = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return latent

    def is_max_denoise(self, sigmas: torch.Tensor) -> bool:
        """σ₀ is σ_max (relative tolerance 1e-5) or above it."""
        max_sigma = float(self.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


# ---------------------------------------------------------------------------------------------------------------
# Schedulers


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5, in float32 like ComfyUI's ``k_diffusion.sampling.get_sigmas_karras``."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log σ."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def normal_schedule(ms: ModelSampling, steps: int, *, sgm: bool = False) -> torch.Tensor:
    """Uniform in timestep from t(σ_max) to t(σ_min); ``sgm`` leaves the last point out."""
    start = ms.sigma_to_t(ms.sigma_max)
    end = ms.sigma_to_t(ms.sigma_min)
    timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1] if sgm else \
        torch.linspace(float(start), float(end), steps)
    # One 0-d evaluation per point, as ComfyUI's normal_scheduler does (a vectorised exp may differ by 1 ulp).
    sigs = [float(ms.t_to_sigma(timesteps[i])) for i in range(len(timesteps))]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def simple_schedule(ms: ModelSampling, steps: int) -> torch.Tensor:
    ss = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def ddim_uniform_schedule(ms: ModelSampling, steps: int) -> torch.Tensor:
    ss = max(len(ms.sigmas) // steps, 1)
    sigs = [float(ms.sigmas[x]) for x in range(1, len(ms.sigmas), ss)]
    return torch.tensor(sigs[::-1] + [0.0], dtype=torch.float32)


def beta_schedule(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    total = len(ms.sigmas) - 1
    step = 1.0 / steps
    sigs: list[float] = []
    last_t = -1.0
    for i in range(steps):
        t = float(round(beta_ppf(1.0 - i * step, alpha, beta) * total))  # round half to even, like rint
        if t != last_t:
            sigs.append(float(ms.sigmas[int(t)]))
        last_t = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


SchedulerFn = Callable[[ModelSampling, int], torch.Tensor]

SCHEDULERS: dict[str, SchedulerFn] = {
    "simple": simple_schedule,
    "sgm_uniform": lambda ms, steps: normal_schedule(ms, steps, sgm=True),
    "karras": lambda ms, steps: karras_sigmas(steps, float(ms.sigma_min), float(ms.sigma_max)),
    "exponential": lambda ms, steps: exponential_sigmas(steps, float(ms.sigma_min), float(ms.sigma_max)),
    "ddim_uniform": ddim_uniform_schedule,
    "beta": beta_schedule,
    "normal": normal_schedule,
}
"""Scheduler name -> ``fn(model_sampling, steps) -> sigmas`` (float32, descending, last = 0), ComfyUI's order."""


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    try:
        fn = SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler!r}; supported: {', '.join(SCHEDULERS)}") from None
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    return fn(ms, steps)


# ---------------------------------------------------------------------------------------------------------------
# Regularized incomplete beta function and its inverse (no scipy)


def _lbeta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _inc_beta_lower(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1/2 from the series of ∫₀ˣ tᵃ⁻¹(1−t)ᵇ⁻¹ dt.

    Expanding ``(1 − t)^(b−1) = Σ_n (1−b)_n tⁿ / n!`` (binomial series, |t| < 1) and integrating term by term:
    ``∫₀ˣ = Σ_n (1−b)_n/n! · x^(a+n)/(a+n)``. For x <= 1/2 the terms fall at least like 2⁻ⁿ, so ~60 terms reach
    double precision.
    """
    if x <= 0.0:
        return 0.0
    total = 0.0
    coeff = 1.0  # (1-b)_n / n!
    xn = 1.0  # x^n
    for n in range(400):
        term = coeff * xn / (a + n)
        total += term
        if abs(term) < 1e-17 * abs(total):
            break
        coeff *= (n + 1 - b) / (n + 1)
        xn *= x
    return math.exp(a * math.log(x) - _lbeta(a, b)) * total


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta function I_x(a, b), the CDF of Beta(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x <= 0.5:
        return _inc_beta_lower(x, a, b)
    return 1.0 - _inc_beta_lower(1.0 - x, b, a)  # symmetry I_x(a,b) = 1 − I_{1−x}(b,a)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile function of Beta(a, b): bisection on :func:`beta_cdf` to double precision."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
