"""Latent nodes and the VAE: empty latents, resizing, batches, noise masks, encode and decode.

A LATENT's ``samples`` are raw VAE latents (the sampler applies the model's scale factor). VAE encoding uses
the posterior's mean, so the same image always gives the same latent.
"""

from __future__ import annotations

import torch

from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.ops import latent as latent_ops
from airflow_comfy.runner.registry import implements
from airflow_comfy.runner.values import Latent, VAEModel


@implements("EmptyLatentImage")
def empty_latent_image(ctx: NodeContext, width: int, height: int, batch_size: int) -> tuple:
    return (latent_ops.empty_latent(width, height, batch_size),)


@implements("LatentUpscale")
def latent_upscale(ctx: NodeContext, samples: Latent, upscale_method: str, width: int, height: int,
                   crop: str) -> tuple:
    return (latent_ops.latent_upscale(samples, upscale_method, width, height, crop),)


@implements("LatentUpscaleBy")
def latent_upscale_by(ctx: NodeContext, samples: Latent, upscale_method: str, scale_by: float) -> tuple:
    return (latent_ops.latent_upscale_by(samples, upscale_method, scale_by),)


@implements("LatentFromBatch")
def latent_from_batch(ctx: NodeContext, samples: Latent, batch_index: int, length: int) -> tuple:
    return (latent_ops.latent_from_batch(samples, batch_index, length),)


@implements("RepeatLatentBatch")
def repeat_latent_batch(ctx: NodeContext, samples: Latent, amount: int) -> tuple:
    return (latent_ops.repeat_latent_batch(samples, amount),)


@implements("SetLatentNoiseMask")
def set_latent_noise_mask(ctx: NodeContext, samples: Latent, mask: torch.Tensor) -> tuple:
    return (latent_ops.set_latent_noise_mask(samples, mask),)


def vae_dtype(ctx: NodeContext) -> torch.dtype:
    # SD VAEs overflow in fp16; keep them fp32 unless bf16 was asked for.
    return torch.bfloat16 if ctx.dtype == torch.bfloat16 else torch.float32


def encode_pixels(ctx: NodeContext, vae: VAEModel, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` (cropped to a multiple of the VAE's downscale, centred) -> raw latents."""
    down = vae.downscale
    height, width = (pixels.shape[1] // down) * down, (pixels.shape[2] // down) * down
    if (height, width) != tuple(pixels.shape[1:3]):
        y, x = (pixels.shape[1] % down) // 2, (pixels.shape[2] % down) // 2
        pixels = pixels[:, y:y + height, x:x + width, :]
    model = vae.vae.to(ctx.device, vae_dtype(ctx))
    # Contiguous NCHW whatever the IMAGE's strides: the VAE's convolutions give other bits for other memory
    # formats, and an IMAGE read from the artifact store has other strides than one computed in the group.
    batch = (pixels[..., :3].movedim(-1, 1) * 2.0 - 1.0).to(ctx.device, vae_dtype(ctx)).contiguous()
    with torch.inference_mode():
        latents = model.encode(batch).latent_dist.mode()
    return latents.float().cpu()


def check_encodable(ctx: NodeContext, vae: VAEModel, pixels: torch.Tensor) -> None:
    """An image smaller than the VAE's downscale factor crops to nothing: bad input, not a convolution error."""
    down = vae.downscale
    if pixels.ndim != 4 or pixels.shape[1] < down or pixels.shape[2] < down:
        size = f"{pixels.shape[2]}×{pixels.shape[1]}" if pixels.ndim == 4 else f"of shape {list(pixels.shape)}"
        raise ctx.bad_input(f"the image is {size} pixels; the VAE needs at least {down}×{down}", "pixels")


@implements("VAEEncode")
def vae_encode(ctx: NodeContext, pixels: torch.Tensor, vae: VAEModel) -> tuple:
    check_encodable(ctx, vae, pixels)
    return (Latent(samples=encode_pixels(ctx, vae, pixels)),)


@implements("VAEEncodeForInpaint")
def vae_encode_for_inpaint(ctx: NodeContext, pixels: torch.Tensor, vae: VAEModel, mask: torch.Tensor,
                           grow_mask_by: int) -> tuple:
    check_encodable(ctx, vae, pixels)
    prepared, noise_mask = latent_ops.vae_encode_for_inpaint_prepare(pixels, mask, grow_mask_by, vae.downscale)
    return (Latent(samples=encode_pixels(ctx, vae, prepared), noise_mask=noise_mask),)


@implements("VAEDecode")
def vae_decode(ctx: NodeContext, samples: Latent, vae: VAEModel) -> tuple:
    model = vae.vae.to(ctx.device, vae_dtype(ctx))
    with torch.inference_mode():
        decoded = model.decode(samples.samples.to(ctx.device, vae_dtype(ctx))).sample
    image = torch.clamp((decoded.float() + 1.0) / 2.0, 0.0, 1.0)
    return (image.movedim(1, -1).cpu(),)
