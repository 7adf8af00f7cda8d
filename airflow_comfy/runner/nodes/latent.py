"""Latent nodes and the VAE: empty latents, resizing, batches, noise masks, encode and decode.

A LATENT's ``samples`` are raw VAE latents (the sampler applies the model's scale factor). VAE encoding uses
the posterior's mean, so the same image always gives the same latent. With a memory budget the VAE's largest
allocation is checked first; in low-memory mode (a retry after running out of memory) the VAE works in tiles
(:mod:`airflow_comfy.runner.ops.vae`).
"""

from __future__ import annotations

import torch

from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.memory import budget_error, check_budget, megabytes
from airflow_comfy.runner.ops import latent as latent_ops
from airflow_comfy.runner.ops import vae as vae_ops
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
        latents = run_vae(ctx, vae, model, batch, encode=True)
    return latents.float().cpu()


def run_vae(ctx: NodeContext, vae: VAEModel, model: torch.nn.Module, source: torch.Tensor, *,
            encode: bool) -> torch.Tensor:
    """Encode pixels ``[B, 3, H, W]`` or decode latents ``[B, C, h, w]`` (on the device, in the VAE's dtype):
    whole (after checking the memory budget), or in tiles in low-memory mode."""
    dtype = vae_dtype(ctx)
    direction = "encode" if encode else "decode"
    estimate = vae_ops.encode_estimate if encode else vae_ops.decode_estimate
    if not ctx.low_memory:
        whole = estimate(model, tuple(source.shape), dtype)
        check_budget(ctx, whole.nbytes, f"VAE {direction}: {whole.what}")
        return vae_ops.encode(model, source) if encode else vae_ops.decode(model, source)
    down = vae.downscale if encode else 1
    rows, cols = source.shape[2] // down, source.shape[3] // down

    def one_tile(tile: int) -> vae_ops.Estimate:
        shape = (1, source.shape[1], min(tile, rows) * down, min(tile, cols) * down)
        return estimate(model, shape, dtype)

    budget = ctx.run.memory_budget
    tiling = vae_ops.choose_tiling(one_tile, rows, cols, budget)
    if tiling is None:
        smallest = one_tile(vae_ops.MIN_TILE)
        raise budget_error(budget, smallest.nbytes, f"VAE {direction} in the smallest tiles "
                                                    f"({vae_ops.MIN_TILE * vae.downscale} px): {smallest.what}")
    pixels = tiling.tile * vae.downscale
    ctx.low_memory_report.update({
        "vae": f"{direction} in tiles", "tile_px": pixels, "overlap_px": tiling.overlap * vae.downscale,
        "tiles": tiling.tiles * source.shape[0], "largest_allocation_bytes": tiling.estimate.nbytes})
    ctx.progress(f"low-memory mode: VAE {direction} in {tiling.tiles * source.shape[0]} tile(s) of {pixels}×{pixels} "
                 f"px, overlap {tiling.overlap * vae.downscale} px (largest allocation "
                 f"{megabytes(tiling.estimate.nbytes)})")
    tiled = vae_ops.encode_tiled if encode else vae_ops.decode_tiled
    return tiled(model, source, tiling.tile, tiling.overlap, vae.downscale)


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
        decoded = run_vae(ctx, vae, model, samples.samples.to(ctx.device, vae_dtype(ctx)), encode=False)
    image = torch.clamp((decoded.float() + 1.0) / 2.0, 0.0, 1.0)
    return (image.movedim(1, -1).cpu(),)
