"""The solvers behind KSampler's ``sampler_name``, one module per family:

* :mod:`.karras` — Euler, Heun and the DPM-2 midpoint method on the probability-flow ODE in σ (Karras et al. 2022);
* :mod:`.ancestral` — their ancestral variants (deterministic step to σ_down, fresh noise of std σ_up);
* :mod:`.lms` — linear multistep;
* :mod:`.dpmpp` — DPM-Solver++ (Lu et al. 2022b): 2M, and the SDE solvers ``dpmpp_sde`` and ``dpmpp_2m_sde``;
* :mod:`.unipc` — UniPC (Zhao et al. 2023);
* :mod:`.common` — the calling convention and shared formulas.

Where bit identity with ComfyUI 0.3.64 is claimed (``samplers.COMFY_EXACT``), the tensor operations and their
order match its samplers, which come from k-diffusion (MIT licence, Katherine Crowson,
https://github.com/crowsonkb/k-diffusion); see the NOTICE file. The code itself is written for this project.
"""

from airflow_comfy.runner.sampling.solvers.ancestral import sample_dpm_2_ancestral, sample_euler_ancestral
from airflow_comfy.runner.sampling.solvers.common import Callback, DenoiseFn, NoiseSampler, SamplerFn
from airflow_comfy.runner.sampling.solvers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_sde
from airflow_comfy.runner.sampling.solvers.karras import sample_dpm_2, sample_euler, sample_heun
from airflow_comfy.runner.sampling.solvers.lms import lms_coefficient, sample_lms
from airflow_comfy.runner.sampling.solvers.unipc import sample_uni_pc, sample_uni_pc_bh2

__all__ = [
    "Callback",
    "DenoiseFn",
    "NoiseSampler",
    "SamplerFn",
    "lms_coefficient",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
]
