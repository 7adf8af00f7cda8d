"""ComfyUI's sampling (KSampler, samplers, schedulers, CFG) re-implemented with torch.

* :mod:`.schedule` — σ table of SD 1.x, 2.x and SDXL, σ <-> timestep, the seven schedulers;
* :mod:`.samplers` — sampler name -> solver (:data:`~.samplers.SAMPLERS`) and the noise each one gets;
* :mod:`.solvers` — the solvers, one module per family (operation order of k-diffusion's, for ComfyUI's bits);
* :mod:`.noise` — the per-step noise: a seeded generator, or torchsde's Brownian tree for the SDE samplers;
* :mod:`.cfg` — the classifier-free-guided denoiser over a diffusers UNet (areas, SDXL, ControlNet hook);
* :mod:`.ksampler` — KSampler / KSamplerAdvanced semantics (noise, schedule slicing, inpainting, scaling);
* :mod:`.progress` — per-step progress lines.
"""

from airflow_comfy.runner.sampling.cfg import CFGDenoiser, ControlFn, make_denoiser
from airflow_comfy.runner.sampling.ksampler import (
    advanced_sigmas,
    ksampler,
    ksampler_advanced,
    prepare_noise,
    sample,
    sigmas_for,
)
from airflow_comfy.runner.sampling.progress import StepProgress
from airflow_comfy.runner.sampling.samplers import SAMPLERS
from airflow_comfy.runner.sampling.schedule import SCHEDULERS, ModelSampling, calculate_sigmas

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "CFGDenoiser",
    "ControlFn",
    "ModelSampling",
    "StepProgress",
    "advanced_sigmas",
    "calculate_sigmas",
    "ksampler",
    "ksampler_advanced",
    "make_denoiser",
    "prepare_noise",
    "sample",
    "sigmas_for",
]
