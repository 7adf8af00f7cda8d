"""The values that flow between nodes inside the runner, in ComfyUI's own shapes (as ComfyUI 0.3.64's
``nodes.py`` passes them).

Serializable (may cross a group boundary, see :mod:`airflow_comfy.runner.codecs`):

* ``IMAGE``: ``torch.float32 [B, H, W, C]`` in 0..1, channels last, C = 3.
* ``MASK``: ``torch.float32 [B, H, W]`` (1 = area to change).
* ``LATENT``: :class:`Latent` — ``samples [B, C, H/8, W/8]`` in raw VAE latent space (NOT multiplied by the
  scale factor; the sampler does that), optional ``noise_mask`` and ``batch_index``.
* ``CONDITIONING``: a list of :class:`CondEntry` (``ConditioningCombine`` is list concatenation).
* ``INT`` / ``FLOAT`` / ``STRING`` / ``BOOLEAN``: Python values.

Model-like (never cross a boundary; each group replays their recipe): :class:`DiffusionModel` (MODEL),
:class:`TextEncoder` (CLIP), :class:`VAEModel` (VAE), :class:`ControlNet` (CONTROL_NET),
:class:`UpscaleModel` (UPSCALE_MODEL). Each keeps the *recipe* it was made from (file names and patch
strengths), which is what a CONDITIONING carrying a ControlNet serializes instead of weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Latent:
    samples: torch.Tensor
    noise_mask: torch.Tensor | None = None
    batch_index: list[int] | None = None

    def with_samples(self, samples: torch.Tensor) -> Latent:
        return replace(self, samples=samples)


@dataclass
class ControlRef:
    """A ControlNet applied to a conditioning (ControlNetApply / ControlNetApplyAdvanced)."""

    control_net: ControlNet
    hint: torch.Tensor
    """IMAGE ``[B, H, W, C]`` the ControlNet is conditioned on."""
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlRef | None = None
    """ComfyUI chains controls: a second ControlNet applied on top keeps the first."""


@dataclass
class CondEntry:
    """One ``[cond_tensor, extras]`` pair of a ComfyUI CONDITIONING."""

    cond: torch.Tensor
    """``[1, tokens, dim]`` text embeddings."""
    pooled_output: torch.Tensor | None = None
    area: tuple[int, int, int, int] | None = None
    """``(height, width, y, x)`` in latent units (pixels // 8), as ConditioningSetArea stores it."""
    strength: float = 1.0
    set_area_to_bounds: bool = False
    control: ControlRef | None = None
    control_apply_to_uncond: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Model-specific extras (e.g. SDXL's size conditioning: width, height, crop_w, crop_h, target_*)."""


Conditioning = list[CondEntry]


@dataclass
class Recipe:
    """How a model-like value was made: the loader node's class, its file, and the patches applied since."""

    loader: str
    file: str
    patches: tuple[tuple[str, str, float, float], ...] = ()
    """``(kind, file, strength_model, strength_clip)`` — e.g. ``("lora", "style.safetensors", 0.8, 0.8)``."""


@dataclass
class DiffusionModel:
    """MODEL: the denoiser (a diffusers UNet) and how sigmas map to timesteps for it."""

    unet: torch.nn.Module
    family: str
    """``sd1``, ``sd2``, ``sdxl`` or ``sdxl_refiner``."""
    latent_scale: float
    """0.18215 (SD 1.x, 2.x), 0.13025 (SDXL): applied by the sampler on the way in and out."""
    recipe: Recipe
    prediction: str = "eps"
    """``eps`` or ``v``."""


@dataclass
class TextEncoder:
    """CLIP: tokenizer(s) and text model(s). SDXL has two (CLIP-L and OpenCLIP-bigG)."""

    tokenizers: list[Any]
    models: list[torch.nn.Module]
    family: str
    recipe: Recipe
    layer: int | None = None
    """CLIPSetLastLayer's ``stop_at_clip_layer`` (-1 = last layer, -2 = "clip skip 2"); None = the model
    family's default (SD 1.x: last layer; SD 2.x, SDXL: penultimate)."""
    embeddings_dir: str | None = None


@dataclass
class VAEModel:
    vae: torch.nn.Module
    """Our :class:`~airflow_comfy.runner.models.autoencoder.Autoencoder` (diffusers' AutoencoderKL, bit for bit)."""
    latent_scale: float
    recipe: Recipe
    downscale: int = 8


@dataclass
class ControlNet:
    model: torch.nn.Module
    recipe: Recipe
    kind: str = "controlnet"
    """``controlnet`` or ``t2i_adapter``."""


@dataclass
class UpscaleModel:
    model: torch.nn.Module
    scale: int
    recipe: Recipe
