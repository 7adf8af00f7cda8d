"""KSampler's ``sampler_name`` -> solver (:data:`SAMPLERS`), and the noise each one gets from ComfyUI 0.3.64.

The solvers live in :mod:`.solvers` (one module per family, each citing its paper); the noise sources in
:mod:`.noise`. :func:`noise_sampler_for` picks the source ComfyUI's KSampler path gives a sampler:

* the ancestral samplers draw from one seeded generator (:class:`~.noise.SeededGaussianNoise`);
* ``dpmpp_sde`` and ``dpmpp_2m_sde`` draw Brownian increments from a ``torchsde.BrownianTree`` on the CPU over
  [smallest positive σ, largest σ] seeded with the KSampler seed (:class:`~.noise.BrownianIncrementNoise`);
* the others are deterministic after the initial noise.

:data:`COMFY_EXACT` says, per sampler, how closely the result reproduces ComfyUI's given the same denoiser.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from airflow_comfy.runner.sampling.noise import BrownianIncrementNoise, SeededGaussianNoise
from airflow_comfy.runner.sampling.solvers import (
    Callback,
    DenoiseFn,
    NoiseSampler,
    SamplerFn,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_uni_pc,
    sample_uni_pc_bh2,
)

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
    "euler_ancestral": _SAME_OPS + _SAME_NOISE_CPU,
    "dpm_2_ancestral": _SAME_OPS + _SAME_NOISE_CPU,
    "dpmpp_sde": _SAME_OPS + _SAME_TREE,
    "dpmpp_2m_sde": _SAME_OPS + _SAME_TREE,
    "lms": _SAME_OPS + "; its coefficients by scipy.integrate.quad on the same float32 schedule, as ComfyUI's",
    "uni_pc": _SAME_OPS + "; the authors' UniPC (bh1) in ComfyUI's VP view of the schedule",
    "uni_pc_bh2": _SAME_OPS + "; the authors' UniPC (bh2) in ComfyUI's VP view of the schedule",
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


__all__ = [
    "ANCESTRAL_SAMPLERS",
    "BIT_EXACT_ON_CPU",
    "COMFY_EXACT",
    "SAMPLERS",
    "SDE_SAMPLERS",
    "Callback",
    "DenoiseFn",
    "NoiseSampler",
    "SamplerFn",
    "noise_sampler_for",
]
