"""KSampler and KSamplerAdvanced: ComfyUI's sampling (noise, schedules, samplers, CFG, areas, ControlNet), with
per-step progress in the task log. The attentions of the UNet and of any ControlNet check the memory budget,
and work in slices in low-memory mode (:func:`airflow_comfy.runner.memory.guarded_attention`)."""

from __future__ import annotations

from dataclasses import replace

import torch

from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.memory import guarded_attention
from airflow_comfy.runner.registry import implements
from airflow_comfy.runner.sampling.ksampler import ksampler, ksampler_advanced
from airflow_comfy.runner.sampling.progress import StepProgress
from airflow_comfy.runner.values import Conditioning, ControlRef, DiffusionModel, Latent


def _on_device(ctx: NodeContext, model: DiffusionModel) -> DiffusionModel:
    unet = model.unet.to(ctx.device, ctx.dtype)
    return model if unet is model.unet else replace(model, unet=unet)


def _control_fn(ctx: NodeContext):
    from airflow_comfy.runner.models.controlnet import control_residuals

    def control(ref: ControlRef, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, percent: float,
                **kwargs):
        # The denoiser applies strength and the start/end window itself: residuals are asked for unscaled.
        ref.control_net.model.to(ctx.device, ctx.dtype)
        return control_residuals(ref.control_net, x_in, t, cond, ref.hint, 1.0)

    return control


def _attention_models(model: DiffusionModel, *conditionings: Conditioning) -> list[tuple[str, torch.nn.Module]]:
    """The UNet and every ControlNet the conditionings apply (their attentions are guarded while sampling)."""
    found: list[tuple[str, torch.nn.Module]] = [("UNet", model.unet)]
    seen = {id(model.unet)}
    for conditioning in conditionings:
        for entry in conditioning:
            control = entry.control
            while control is not None:
                net = control.control_net.model
                if id(net) not in seen:
                    seen.add(id(net))
                    found.append((f"ControlNet {control.control_net.recipe.file}", net))
                control = control.previous
    return found


def _progress(ctx: NodeContext) -> StepProgress:
    return StepProgress("sampling", write=ctx.progress, every=1)


@implements("KSampler")
def k_sampler(ctx: NodeContext, model: DiffusionModel, seed: int, steps: int, cfg: float, sampler_name: str,
              scheduler: str, positive: Conditioning, negative: Conditioning, latent_image: Latent,
              denoise: float) -> tuple:
    with torch.inference_mode():
        model = _on_device(ctx, model)
        with guarded_attention(ctx, *_attention_models(model, positive, negative)):
            out = ksampler(model, latent_image, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                           scheduler=scheduler, positive=positive, negative=negative, denoise=denoise,
                           control_fn=_control_fn(ctx), progress=_progress(ctx))
    return (out,)


@implements("KSamplerAdvanced")
def k_sampler_advanced(ctx: NodeContext, model: DiffusionModel, add_noise: str, noise_seed: int, steps: int,
                       cfg: float, sampler_name: str, scheduler: str, positive: Conditioning,
                       negative: Conditioning, latent_image: Latent, start_at_step: int, end_at_step: int,
                       return_with_leftover_noise: str) -> tuple:
    with torch.inference_mode():
        model = _on_device(ctx, model)
        with guarded_attention(ctx, *_attention_models(model, positive, negative)):
            out = ksampler_advanced(model, latent_image, add_noise=add_noise, noise_seed=noise_seed, steps=steps,
                                    cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, positive=positive,
                                    negative=negative, start_at_step=start_at_step, end_at_step=end_at_step,
                                    return_with_leftover_noise=return_with_leftover_noise,
                                    control_fn=_control_fn(ctx), progress=_progress(ctx))
    return (out,)
