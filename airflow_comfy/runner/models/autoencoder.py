"""The KL autoencoder (the SD VAE) in plain torch: encoder, decoder and the quant convolutions, built from a
diffusers ``AutoencoderKL`` config and computing exactly what that class computes.

Why our own: a group that only decodes or encodes (VAEDecode, VAEEncode, SaveImage) would otherwise import
diffusers (seconds) just to build this one module. Here it costs nothing beyond torch.

Its parameter names are those of diffusers' ``AutoencoderKL`` state dict (``encoder.down_blocks.0.resnets.0.
norm1.weight``, ``decoder.mid_block.attentions.0.to_q.weight``, ...), so that diffusers folders, diffusers-layout
VAE files and the LDM key plans of :mod:`.layout` (:func:`~.layout.vae_plan`) fill it unchanged, and its block
attributes (``down_blocks``/``up_blocks``, ``resnets``, ``downsamplers``/``upsamplers``,
``mid_block.attentions``) are the ones the VAE's memory estimates walk (:mod:`airflow_comfy.runner.ops.vae`).

Bit-identical to diffusers (``torch.equal``, same threads): every operation is the one diffusers runs, in its
order and on tensors of the same strides — group norms with eps 1e-6, SiLU, 3x3 convolutions, the encoder's
asymmetric zero pad (right and bottom) before each stride-2 convolution, the decoder's nearest 2x upsampling,
and the mid block's single-head self-attention through ``scaled_dot_product_attention`` on the token-major view
of the normalised feature map, added to its input. Divisions by an output scale of 1 are left out (exact).
``decode(z).sample`` and ``encode(x).latent_dist.mode()`` answer as diffusers' do; the posterior's mean is the
first half of the moments' channels, and scaling (``scaling_factor``) is left to the caller, as with diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6
"""Every group norm of the SD VAE (diffusers' ``resnet_eps`` for the autoencoder)."""

ENCODER_BLOCK = "DownEncoderBlock2D"
DECODER_BLOCK = "UpDecoderBlock2D"


class UnsupportedAutoencoder(ValueError):
    """A config this module does not build (another block type or activation, a spatial-norm decoder)."""


@dataclass(frozen=True)
class AutoencoderShape:
    """The parts of an ``AutoencoderKL`` config that shape the module."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int = 1
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> AutoencoderShape:
        """The shape of a diffusers ``AutoencoderKL`` config; refuses what diffusers would build differently."""
        blocks = tuple(int(c) for c in config.get("block_out_channels", (64,)))
        for key, allowed in (("down_block_types", ENCODER_BLOCK), ("up_block_types", DECODER_BLOCK)):
            kinds = list(config.get(key) or [allowed] * len(blocks))
            if len(kinds) != len(blocks) or any(kind != allowed for kind in kinds):
                raise UnsupportedAutoencoder(f"VAE config {key} {kinds}: only {len(blocks)} x {allowed} is built")
        if config.get("act_fn", "silu") != "silu":
            raise UnsupportedAutoencoder(f"VAE config act_fn {config.get('act_fn')!r}: only 'silu' is built")
        return cls(block_out_channels=blocks, layers_per_block=int(config.get("layers_per_block", 1)),
                   in_channels=int(config.get("in_channels", 3)), out_channels=int(config.get("out_channels", 3)),
                   latent_channels=int(config.get("latent_channels", 4)),
                   norm_num_groups=int(config.get("norm_num_groups", 32)),
                   use_quant_conv=bool(config.get("use_quant_conv", True)),
                   use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
                   mid_block_add_attention=bool(config.get("mid_block_add_attention", True)))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


def _conv3(channels_in: int, channels_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=stride, padding=padding)


class ResidualBlock(nn.Module):
    """norm → SiLU → conv, twice, added to the input (through a 1x1 convolution when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = _conv3(out_channels, out_channels)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a group norm in front and the input
    added back (the VAE's mid block)."""

    upcast_softmax = True
    """Read by the memory estimate: it counts the score matrix in float32, as it does for diffusers' module."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.heads = 1
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x.view(batch, channels, height * width)).transpose(1, 2)
        q, k, v = (self._heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        attended = attended.transpose(1, 2).reshape(batch, -1, channels).to(q.dtype)
        out = self.to_out[0](attended)
        return out.transpose(-1, -2).reshape(batch, channels, height, width) + x

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = projected.shape
        return projected.view(batch, tokens, self.heads, channels // self.heads).transpose(1, 2)


class MidBlock(nn.Module):
    """Residual block, self-attention (unless the config leaves it out), residual block."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResidualBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Halves the size: zero pad right and bottom by one, then a stride-2 3x3 convolution without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Doubles the size: nearest-neighbour 2x, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class DecoderStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers or ():
            x = up(x)
        return x


class Encoder(nn.Module):
    """Pixels → the posterior's moments (mean and log-variance, ``2 × latent_channels``), before quant_conv."""

    def __init__(self, shape: AutoencoderShape):
        super().__init__()
        widths, groups = shape.block_out_channels, shape.norm_num_groups
        self.conv_in = _conv3(shape.in_channels, widths[0])
        self.down_blocks = nn.ModuleList([
            EncoderStage(widths[max(i - 1, 0)], width, shape.layers_per_block, groups, i < len(widths) - 1)
            for i, width in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], groups, shape.mid_block_add_attention)
        self.conv_norm_out = _norm(widths[-1], groups)
        self.conv_out = _conv3(widths[-1], 2 * shape.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (after post_quant_conv) → pixels in about -1..1."""

    def __init__(self, shape: AutoencoderShape):
        super().__init__()
        widths, groups = tuple(reversed(shape.block_out_channels)), shape.norm_num_groups
        self.conv_in = _conv3(shape.latent_channels, widths[0])
        self.up_blocks = nn.ModuleList([
            DecoderStage(widths[max(i - 1, 0)], width, shape.layers_per_block + 1, groups, i < len(widths) - 1)
            for i, width in enumerate(widths)])
        self.mid_block = MidBlock(widths[0], groups, shape.mid_block_add_attention)
        self.conv_norm_out = _norm(widths[-1], groups)
        self.conv_out = _conv3(widths[-1], shape.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for stage in self.up_blocks:
            x = stage(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass(frozen=True)
class Posterior:
    """The encoder's diagonal Gaussian; only its mode is used (the same image always gives the same latent)."""

    moments: torch.Tensor

    def mode(self) -> torch.Tensor:
        return torch.chunk(self.moments, 2, dim=1)[0]


@dataclass(frozen=True)
class Encoded:
    latent_dist: Posterior


@dataclass(frozen=True)
class Decoded:
    sample: torch.Tensor


class Autoencoder(nn.Module):
    """The SD VAE: ``encode(pixels).latent_dist.mode()`` → raw latents, ``decode(latents).sample`` → pixels."""

    def __init__(self, shape: AutoencoderShape):
        super().__init__()
        self.architecture = shape
        self.encoder = Encoder(shape)
        self.decoder = Decoder(shape)
        moments = 2 * shape.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if shape.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(shape.latent_channels, shape.latent_channels, 1)
                                if shape.use_post_quant_conv else None)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Autoencoder:
        return cls(AutoencoderShape.of(config))

    def encode(self, pixels: torch.Tensor) -> Encoded:
        moments = self.encoder(pixels)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return Encoded(Posterior(moments))

    def decode(self, latents: torch.Tensor) -> Decoded:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return Decoded(self.decoder(latents))
