"""KSampler / KSamplerAdvanced as pure functions (ComfyUI 0.3.64: ``nodes.py`` ``common_ksampler``,
``comfy/sample.py``, ``comfy/samplers.py``).

The steps, in order:

1. :func:`prepare_noise` — ``randn(latent.shape)`` from a CPU generator seeded with ``seed``, the whole batch at
   once (or per item for a ``batch_index``); zeros for ``add_noise = disable``.
2. :func:`sigmas_for` — the scheduler's σ for ``steps`` (or ``int(steps/denoise)`` keeping the last
   ``steps + 1`` when denoise < 1; empty when denoise <= 0); the DPM-2 / UniPC samplers get the schedule for
   ``steps + 1`` with its penultimate σ dropped. :func:`advanced_sigmas` applies KSamplerAdvanced's
   start/end steps.
3. The latent goes into model space (× latent_scale) unless it is all zeros; x₀ = noise·√(1+σ₀²) + latent at
   full denoise (σ₀ = σ_max), noise·σ₀ + latent otherwise.
4. With a ``noise_mask`` (inpainting), the mask is resized bilinearly to the latent and the denoiser is wrapped:
   before each call ``x = x·m + (latent + noise·σ)·(1−m)``, after it ``d = d·m + latent·(1−m)``, with the same
   initial noise (``ddim``: a separate noise from seed + 1).
5. The sampler runs; the result is divided by latent_scale (always) and returned as a new :class:`Latent`
   carrying the input's ``noise_mask`` and ``batch_index``.

An empty schedule (denoise 0, start_at_step past the end) returns the input latent unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from airflow_comfy.runner.sampling.cfg import ControlFn, make_denoiser, repeat_to_batch_size
from airflow_comfy.runner.sampling.samplers import SAMPLERS, DenoiseFn, noise_sampler_for
from airflow_comfy.runner.sampling.schedule import SCHEDULERS, ModelSampling, calculate_sigmas
from airflow_comfy.runner.values import Conditioning, DiffusionModel, Latent

DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
"""Samplers whose schedule is computed for steps + 1 with the penultimate σ removed (ComfyUI's
``comfy/samplers.py`` ``DISCARD_PENULTIMATE_SIGMA_SAMPLERS``)."""

RANDOM_INPAINT_NOISE_SAMPLERS = frozenset({"ddim"})
"""Samplers whose inpainting blend uses a separate noise drawn from seed + 1 (ComfyUI's
``comfy/samplers.py``: ``ddim`` is ``euler`` with the ``random`` inpaint option)."""

Progress = Callable[[int, int], None]
"""``progress(done_steps, total_steps)``, called after each sampler step."""

_MAX_SEED = (1 << 64) - 1


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64 - 1], not {seed}")
    return seed


def prepare_noise(latent: Latent | torch.Tensor, seed: int, *, add_noise: bool = True) -> torch.Tensor:
    """The initial noise, on the CPU, in the latent's dtype (ComfyUI's ``comfy.sample.prepare_noise``)."""
    samples = latent.samples if isinstance(latent, Latent) else latent
    batch_index = latent.batch_index if isinstance(latent, Latent) else None
    if not add_noise:
        return torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout, device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(_check_seed(seed))
    if not batch_index:
        return torch.randn(samples.size(), dtype=samples.dtype, layout=samples.layout, generator=generator,
                           device="cpu")
    # One [1, C, H, W] draw per index 0 .. max(batch_index), in order; keep the requested ones, in their order.
    wanted = set(batch_index)
    draws: dict[int, torch.Tensor] = {}
    for i in range(max(batch_index) + 1):
        noise = torch.randn([1] + list(samples.size())[1:], dtype=samples.dtype, layout=samples.layout,
                            generator=generator, device="cpu")
        if i in wanted:
            draws[i] = noise
    return torch.cat([draws[i] for i in batch_index], dim=0)


def sigmas_for(scheduler: str, steps: int, denoise: float | None = 1.0, *, sampler_name: str | None = None,
               model_sampling: ModelSampling | None = None) -> torch.Tensor:
    """KSampler's σ schedule for ``steps`` and ``denoise`` (ComfyUI's ``KSampler.set_steps``)."""
    ms = model_sampling or ModelSampling()

    def full(n: int) -> torch.Tensor:
        if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = calculate_sigmas(ms, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return calculate_sigmas(ms, scheduler, n)

    if denoise is None or denoise > 0.9999:
        return full(steps)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    new_steps = int(steps / denoise)
    return full(new_steps)[-(steps + 1):]


def advanced_sigmas(sigmas: torch.Tensor, start_at_step: int | None = None, end_at_step: int | None = None,
                    force_full_denoise: bool = False) -> torch.Tensor:
    """KSamplerAdvanced's slicing: cut at ``end_at_step`` (last σ set to 0 when ``force_full_denoise``), then
    start at ``start_at_step``; an empty result means "return the latent unchanged"."""
    if end_at_step is not None and end_at_step < len(sigmas) - 1:
        sigmas = sigmas[:end_at_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_at_step is not None:
        if start_at_step < len(sigmas) - 1:
            sigmas = sigmas[start_at_step:]
        else:
            return sigmas[:0]
    return sigmas


def initial_x(noise: torch.Tensor, latent_in: torch.Tensor, sigmas: torch.Tensor,
              model_sampling: ModelSampling | None = None) -> torch.Tensor:
    """x at σ₀: ``noise·√(1+σ₀²) + latent`` when σ₀ is σ_max (full denoise), ``noise·σ₀ + latent`` otherwise."""
    ms = model_sampling or ModelSampling()
    return ms.noise_scaling(sigmas[0], noise, latent_in, ms.is_max_denoise(sigmas))


def latent_to_model(samples: torch.Tensor, latent_scale: float) -> torch.Tensor:
    """× latent_scale, unless the latent is all zeros (an EmptyLatentImage is left as is)."""
    if torch.count_nonzero(samples) > 0:
        return samples * latent_scale
    return samples


def latent_from_model(samples: torch.Tensor, latent_scale: float) -> torch.Tensor:
    return samples / latent_scale


def prepare_mask(noise_mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A MASK (``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``) resized bilinearly to the latent and repeated over
    channels and batch: ``[B, C, h, w]``."""
    mask = noise_mask.float().reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1]))
    mask = F.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    if mask.shape[1] < shape[1]:
        mask = mask.repeat((1, shape[1], 1, 1))[:, :shape[1]]
    return repeat_to_batch_size(mask, shape[0])


def inpaint_denoiser(denoise_fn: DenoiseFn, latent_image: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                     model_sampling: ModelSampling) -> DenoiseFn:
    """Keep the unmasked part on the path of the original latent (ComfyUI's ``KSamplerX0Inpaint``)."""
    latent_mask = 1.0 - mask

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = x * mask + model_sampling.noise_scaling(sigma, noise, latent_image) * latent_mask
        out = denoise_fn(x, sigma)
        return out * mask + latent_image * latent_mask

    return fn


def _device_of(denoise_fn: DenoiseFn, default: torch.device) -> torch.device:
    device = getattr(denoise_fn, "device", None)
    return torch.device(device) if device is not None else default


def sample(denoise_fn: DenoiseFn, latent: Latent, *, seed: int, steps: int, sampler_name: str, scheduler: str,
           latent_scale: float, denoise: float | None = 1.0, model_sampling: ModelSampling | None = None,
           add_noise: bool = True, start_at_step: int | None = None, end_at_step: int | None = None,
           force_full_denoise: bool = False, sigmas: torch.Tensor | None = None,
           device: torch.device | str | None = None, progress: Progress | None = None) -> Latent:
    """Run one KSampler pass of ``denoise_fn`` (usually a :class:`~.cfg.CFGDenoiser`) over ``latent``.

    ``sigmas`` overrides the schedule (then ``steps``/``scheduler``/``denoise`` are not used for it).
    ``denoise_fn`` may define ``prepare(latent_in, denoise_mask, noise)`` (called once before sampling) and
    ``device`` (where noise and latent are moved; default: the latent's device).
    """
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; supported: {', '.join(SAMPLERS)}")
    if sigmas is None and scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; supported: {', '.join(SCHEDULERS)}")
    ms = model_sampling or ModelSampling()
    samples = latent.samples
    noise = prepare_noise(latent, seed, add_noise=add_noise)
    if sigmas is None:
        sigmas = sigmas_for(scheduler, steps, denoise, sampler_name=sampler_name, model_sampling=ms)
    sigmas = advanced_sigmas(sigmas, start_at_step, end_at_step, force_full_denoise)
    if sigmas.numel() == 0:
        return latent

    device = torch.device(device) if device is not None else _device_of(denoise_fn, samples.device)
    latent_in = latent_to_model(samples, latent_scale).to(device)
    noise = noise.to(device)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    mask = prepare_mask(latent.noise_mask, noise.shape).to(device) if latent.noise_mask is not None else None

    prepare = getattr(denoise_fn, "prepare", None)
    if callable(prepare):
        prepare(latent_in, mask, noise)

    fn = denoise_fn
    if mask is not None:
        inpaint_noise = noise
        if sampler_name in RANDOM_INPAINT_NOISE_SAMPLERS:
            generator = torch.Generator(device="cpu").manual_seed((_check_seed(seed) + 1) & _MAX_SEED)
            inpaint_noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(device)
        fn = inpaint_denoiser(denoise_fn, latent_in, inpaint_noise, mask, ms)

    x = initial_x(noise, latent_in, sigmas, ms)
    total = len(sigmas) - 1
    callback = None
    if progress is not None:
        def callback(i: int, _x: torch.Tensor, _denoised: torch.Tensor) -> None:
            progress(i + 1, total)

    noise_sampler = noise_sampler_for(sampler_name, x, sigmas, seed)
    out = SAMPLERS[sampler_name](fn, x, sigmas, noise_sampler=noise_sampler, callback=callback)
    out = ms.inverse_noise_scaling(sigmas[-1], out)
    out = latent_from_model(out.to(torch.float32), latent_scale).cpu()
    return Latent(samples=out, noise_mask=latent.noise_mask, batch_index=latent.batch_index)


# ---------------------------------------------------------------------------------------------------------------
# The two nodes


def ksampler(model: DiffusionModel, latent: Latent, *, seed: int, steps: int, cfg: float, sampler_name: str,
             scheduler: str, positive: Conditioning, negative: Conditioning, denoise: float = 1.0,
             control_fn: ControlFn | None = None, progress: Progress | None = None) -> Latent:
    """The KSampler node."""
    ms = ModelSampling(model.prediction)
    denoiser = make_denoiser(model, positive, negative, cfg, model_sampling=ms, control_fn=control_fn)
    return sample(denoiser, latent, seed=seed, steps=steps, sampler_name=sampler_name, scheduler=scheduler,
                  latent_scale=model.latent_scale, denoise=denoise, model_sampling=ms, progress=progress)


def ksampler_advanced(model: DiffusionModel, latent: Latent, *, add_noise: bool | str, noise_seed: int, steps: int,
                      cfg: float, sampler_name: str, scheduler: str, positive: Conditioning,
                      negative: Conditioning, start_at_step: int = 0, end_at_step: int = 10000,
                      return_with_leftover_noise: bool | str = False, control_fn: ControlFn | None = None,
                      progress: Progress | None = None) -> Latent:
    """The KSamplerAdvanced node (``add_noise`` / ``return_with_leftover_noise`` as booleans or the combo
    strings ``"enable"`` / ``"disable"``)."""
    if isinstance(add_noise, str):
        add_noise = add_noise == "enable"
    if isinstance(return_with_leftover_noise, str):
        return_with_leftover_noise = return_with_leftover_noise == "enable"
    ms = ModelSampling(model.prediction)
    denoiser = make_denoiser(model, positive, negative, cfg, model_sampling=ms, control_fn=control_fn)
    return sample(denoiser, latent, seed=noise_seed, steps=steps, sampler_name=sampler_name, scheduler=scheduler,
                  latent_scale=model.latent_scale, denoise=1.0, model_sampling=ms, add_noise=bool(add_noise),
                  start_at_step=start_at_step, end_at_step=end_at_step,
                  force_full_denoise=not return_with_leftover_noise, progress=progress)


__all__ = [
    "DISCARD_PENULTIMATE_SIGMA_SAMPLERS",
    "Progress",
    "advanced_sigmas",
    "initial_x",
    "inpaint_denoiser",
    "ksampler",
    "ksampler_advanced",
    "latent_from_model",
    "latent_to_model",
    "prepare_mask",
    "prepare_noise",
    "sample",
    "sigmas_for",
]
