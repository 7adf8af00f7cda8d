"""Latent operations of the core nodes (ComfyUI 0.3.64 ``nodes.py``: EmptyLatentImage, LatentUpscale,
LatentUpscaleBy, LatentFromBatch, RepeatLatentBatch, SetLatentNoiseMask, VAEEncodeForInpaint), pure torch, no
model.

A :class:`~airflow_comfy.runner.values.Latent` carries ``samples [B, C, H/8, W/8]`` and optionally a
``noise_mask`` and a ``batch_index`` (the indices of the items in the seed's noise sequence, as ComfyUI's
``comfy/sample.py`` ``prepare_noise`` draws it). Like ComfyUI's ``samples.copy()``, an operation that only
changes ``samples`` keeps the other two as they were.

Faithful to ComfyUI 0.3.64 including one quirk: :func:`repeat_latent_batch` repeats the *original*
``noise_mask`` ``amount`` times even when it has fewer items than the latent (ComfyUI computes a padded mask
and then does not use it); the sampler then cycles it to the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from airflow_comfy.runner.ops.image import common_upscale
from airflow_comfy.runner.values import Latent

LATENT_CHANNELS = 4
MIN_LATENT_UPSCALE_PIXELS = 64


def empty_latent(width: int, height: int, batch_size: int = 1, channels: int = LATENT_CHANNELS) -> Latent:
    """EmptyLatentImage: zeros ``[batch_size, channels, height // 8, width // 8]``."""
    return Latent(samples=torch.zeros([batch_size, channels, height // 8, width // 8]))


def latent_upscale(latent: Latent, method: str, width: int, height: int, crop: str) -> Latent:
    """LatentUpscale: to ``width × height`` pixels (each at least 64, then ``// 8`` in latent units).

    A 0 size follows the aspect ratio of the latent; both 0 returns the latent unchanged.
    """
    if width == 0 and height == 0:
        return latent
    samples = latent.samples
    if width == 0:
        height = max(MIN_LATENT_UPSCALE_PIXELS, height)
        width = max(MIN_LATENT_UPSCALE_PIXELS, round(samples.shape[-1] * height / samples.shape[-2]))
    elif height == 0:
        width = max(MIN_LATENT_UPSCALE_PIXELS, width)
        height = max(MIN_LATENT_UPSCALE_PIXELS, round(samples.shape[-2] * width / samples.shape[-1]))
    else:
        width = max(MIN_LATENT_UPSCALE_PIXELS, width)
        height = max(MIN_LATENT_UPSCALE_PIXELS, height)
    return latent.with_samples(common_upscale(samples, width // 8, height // 8, method, crop))


def latent_upscale_by(latent: Latent, method: str, scale_by: float) -> Latent:
    """LatentUpscaleBy: ``round(w·s) × round(h·s)`` in latent units, no crop."""
    samples = latent.samples
    width = round(samples.shape[-1] * scale_by)
    height = round(samples.shape[-2] * scale_by)
    return latent.with_samples(common_upscale(samples, width, height, method, "disabled"))


def _masks_to_batch(masks: torch.Tensor, batch: int) -> torch.Tensor:
    """Cycle a mask batch up to ``batch`` items (leaves a longer one alone)."""
    if masks.shape[0] < batch:
        masks = masks.repeat(math.ceil(batch / masks.shape[0]), 1, 1, 1)[:batch]
    return masks


def latent_from_batch(latent: Latent, batch_index: int, length: int) -> Latent:
    """LatentFromBatch: items ``batch_index .. batch_index + length − 1`` (both clamped to the batch).

    A one-item ``noise_mask`` is kept; a longer one is cycled to the batch size and sliced the same way.
    ``batch_index`` becomes the slice of the existing one, or ``range(batch_index, batch_index + length)``.
    """
    samples = latent.samples
    size = samples.shape[0]
    batch_index = min(size - 1, batch_index)
    length = min(size - batch_index, length)
    noise_mask = latent.noise_mask
    if noise_mask is not None:
        if noise_mask.shape[0] == 1:
            noise_mask = noise_mask.clone()
        else:
            noise_mask = _masks_to_batch(noise_mask, size)[batch_index:batch_index + length].clone()
    if latent.batch_index is None:
        indices = list(range(batch_index, batch_index + length))
    else:
        indices = list(latent.batch_index[batch_index:batch_index + length])
    return Latent(samples=samples[batch_index:batch_index + length].clone(), noise_mask=noise_mask,
                  batch_index=indices)


def repeat_latent_batch(latent: Latent, amount: int) -> Latent:
    """RepeatLatentBatch: the batch ``amount`` times over.

    A ``noise_mask`` with more than one item is repeated too (see the module note); an existing
    ``batch_index`` is extended by copies shifted by ``max − min + 1`` per repeat (an absent one stays absent).
    """
    noise_mask = latent.noise_mask
    if noise_mask is not None and noise_mask.shape[0] > 1:
        noise_mask = noise_mask.repeat((amount, 1, 1, 1))
    indices = latent.batch_index
    if indices is not None:
        offset = max(indices) - min(indices) + 1
        indices = list(indices) + [x + i * offset for i in range(1, amount) for x in indices]
    return Latent(samples=latent.samples.repeat((amount, 1, 1, 1)), noise_mask=noise_mask,
                  batch_index=indices)


def set_latent_noise_mask(latent: Latent, mask: torch.Tensor) -> Latent:
    """SetLatentNoiseMask: attach ``mask`` reshaped to ``[B, 1, H, W]`` (any size: the sampler resizes it)."""
    return Latent(samples=latent.samples, noise_mask=mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                  batch_index=latent.batch_index)


def vae_encode_for_inpaint_prepare(
    pixels: torch.Tensor, mask: torch.Tensor, grow_mask_by: int, downscale: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-free part of VAEEncodeForInpaint: ``(pixels to encode, noise_mask)``.

    * the mask is resized to the image (bilinear) and both are cropped to a multiple of ``downscale``,
      keeping the centre (offset ``(size % downscale) // 2``);
    * pixels under the rounded mask become 0.5 grey (RGB only; the result has 3 channels, as the VAE
      encodes);
    * ``noise_mask [B, 1, H, W]`` = rounded mask dilated by a ``grow_mask_by``² box (``conv2d`` with padding
      ``ceil((g − 1) / 2)``, clamped to 0..1, cropped back to the image), rounded. ``grow_mask_by = 0``: the
      resized mask, rounded.

    The caller encodes the returned pixels and stores ``{"samples": ..., "noise_mask": ...}``.
    """
    height = (pixels.shape[1] // downscale) * downscale
    width = (pixels.shape[2] // downscale) * downscale
    mask = F.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear", align_corners=False)
    pixels = pixels.clone()
    if pixels.shape[1] != height or pixels.shape[2] != width:
        y_offset = (pixels.shape[1] % downscale) // 2
        x_offset = (pixels.shape[2] % downscale) // 2
        pixels = pixels[:, y_offset:height + y_offset, x_offset:width + x_offset, :]
        mask = mask[:, :, y_offset:height + y_offset, x_offset:width + x_offset]

    if grow_mask_by == 0:
        grown = mask
    else:
        kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by), dtype=mask.dtype)
        padding = math.ceil((grow_mask_by - 1) / 2)
        grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=padding), 0, 1)

    keep = (1.0 - mask.round()).squeeze(1)
    pixels = pixels[..., :3].clone()
    for c in range(3):
        pixels[:, :, :, c] -= 0.5
        pixels[:, :, :, c] *= keep
        pixels[:, :, :, c] += 0.5
    return pixels, grown[:, :, :height, :width].round()


__all__ = [
    "LATENT_CHANNELS",
    "empty_latent",
    "latent_from_batch",
    "latent_upscale",
    "latent_upscale_by",
    "repeat_latent_batch",
    "set_latent_noise_mask",
    "vae_encode_for_inpaint_prepare",
]
