"""The VAE (:class:`~airflow_comfy.runner.models.autoencoder.Autoencoder`, or a diffusers ``AutoencoderKL``: the
same interface and block attributes) in both directions, whole or in overlapping tiles, and estimates of
the largest single allocation either makes.

Whole: ``vae.decode(latents)`` / ``vae.encode(pixels).latent_dist.mode()``, exactly as the nodes always did.

Tiled (the runner's low-memory mode): the latent (decode) or the image (encode) is cut into square tiles of
``tile`` latent pixels that overlap by at least ``overlap``; tiles are spread evenly so that every tile has
the full size (no thin strips at the edges), each tile is run through the VAE on its own, one batch item at
a time, and the results are averaged with weights that grow linearly with the distance from the tile's cut
edges (the image's own border is not a cut): a pixel counts most in the tile where it has the most context
around it. Only the output, a weight map and one tile are in memory at once. The result is close to, not
equal to, the whole computation: the VAE's group norms see one tile instead of the whole image, its attention
sees only the tile's tokens, and pixels near a cut miss the context beyond it.

This is our own tiling rather than diffusers' ``enable_tiling()``: that one switches a flag on the (shared,
cached) model, takes its tile size from the config's ``sample_size`` (so a 512 × 512 SD 1.x decode is not
tiled at all: its latent is not larger than the 64-pixel tile), keeps every decoded tile in memory until the
end, has no way to pick a tile for a memory budget, returns an image of the wrong size when the tile does not
divide the latent (68 × 68 for 64 × 64 in 40-pixel tiles), and, at equal tiles, is further from the whole
decode than ours. Measured on the demo SD 1.x VAE (random weights, 32 channels, a receptive field as wide as a
small tile: far more sensitive to tiling than a trained VAE) decoding latents the demo UNet sampled, CPU,
float32, differences to the whole decode in 8-bit levels, max / mean (diffusers' at the same tile):

=========  ========================  ======================  ====================
image      tiles                     ours                    diffusers
=========  ========================  ======================  ====================
512 px     9 of 256 px (overlap 64)  11.9 / 1.21             23.4 / 1.77
512 px     4 of 384 px               5.5 / 0.53              11.8 / 0.80
256 px     9 of 128 px               20.6 / 2.37             37.1 / 3.82
256 px     4 of 192 px               8.6 / 0.79              24.1 / 1.98
64 px      4 of 56 px                22.6 / 2.87             wrong size
64 px      9 of 32 px                59.3 / 10.6             114 / 17.4
=========  ========================  ======================  ====================

Encoding a 512-pixel image in 256-pixel tiles moves its latents by 0.017 on average (their std: 0.235).

Estimates (:func:`decode_estimate`, :func:`encode_estimate`) walk the VAE's blocks and return the largest of
its activations (``batch × channels × height × width × bytes``) and the mid block's attention score matrix
(``batch × heads × tokens² × bytes``, in float32 where diffusers upcasts the softmax): the allocation the
memory budget (``--memory-budget-mb``) is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_TILE = 64
"""Latent pixels per tile side (512 image pixels for an 8× VAE) when no budget asks for less."""
MIN_TILE = 4
"""The smallest tile tried (32 image pixels): below it the group norms see too little of the image."""


@dataclass(frozen=True)
class Estimate:
    nbytes: int
    what: str
    """Which allocation, e.g. ``decoder activation [1, 256, 512, 512] float32``."""


@dataclass(frozen=True)
class Tiling:
    tile: int
    overlap: int
    tiles: int
    """Tiles per batch item."""
    estimate: Estimate
    """Of one tile."""


# --- estimates --------------------------------------------------------------------------------------------------


def _largest(candidates: list[Estimate]) -> Estimate:
    return max(candidates, key=lambda e: e.nbytes)


def _activation(label: str, batch: int, channels: int, height: int, width: int, dtype: torch.dtype) -> Estimate:
    size = batch * channels * height * width * dtype.itemsize
    return Estimate(size, f"{label} activation [{batch}, {channels}, {height}, {width}] {_dtype_name(dtype)}")


def _attention(label: str, block: torch.nn.Module | None, batch: int, tokens: int,
               dtype: torch.dtype) -> list[Estimate]:
    found = []
    for attn in getattr(block, "attentions", None) or []:
        if attn is None:
            continue
        heads = int(getattr(attn, "heads", 1))
        upcast = getattr(attn, "upcast_softmax", False) or getattr(attn, "upcast_attention", False)
        score_dtype = torch.float32 if upcast else dtype
        size = batch * heads * tokens * tokens * score_dtype.itemsize
        found.append(Estimate(size, f"{label} attention scores [{batch}, {heads}, {tokens}, {tokens}] "
                                    f"{_dtype_name(score_dtype)}"))
    return found


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decode_estimate(vae: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> Estimate:
    """The largest single allocation of decoding latents of ``shape`` ``[B, C, h, w]`` in ``dtype``."""
    batch, _, height, width = shape
    decoder = vae.decoder
    found = [_activation("decoder", batch, decoder.conv_in.out_channels, height, width, dtype)]
    found += _attention("decoder mid-block", decoder.mid_block, batch, height * width, dtype)
    scale = 1
    for block in decoder.up_blocks:
        first, last = block.resnets[0], block.resnets[-1]
        found.append(_activation("decoder", batch, max(first.in_channels, last.out_channels),
                                 height * scale, width * scale, dtype))
        if getattr(block, "upsamplers", None):
            scale *= 2
            found.append(_activation("decoder", batch, last.out_channels, height * scale, width * scale, dtype))
    return _largest(found)


def encode_estimate(vae: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> Estimate:
    """The largest single allocation of encoding images of ``shape`` ``[B, 3, H, W]`` in ``dtype``."""
    batch, _, height, width = shape
    encoder = vae.encoder
    found = [_activation("encoder", batch, encoder.conv_in.out_channels, height, width, dtype)]
    for block in encoder.down_blocks:
        first, last = block.resnets[0], block.resnets[-1]
        found.append(_activation("encoder", batch, max(first.in_channels, last.out_channels), height, width, dtype))
        if getattr(block, "downsamplers", None):
            height, width = (height + 1) // 2, (width + 1) // 2
    found += _attention("encoder mid-block", encoder.mid_block, batch, height * width, dtype)
    return _largest(found)


# --- whole --------------------------------------------------------------------------------------------------------


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` raw latents (on the VAE's device and dtype) -> ``[B, 3, H, W]`` in -1..1 (VAE dtype)."""
    return vae.decode(latents).sample


def encode(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in -1..1 -> the posterior's mean ``[B, C, h, w]``."""
    return vae.encode(pixels).latent_dist.mode()


# --- tiles --------------------------------------------------------------------------------------------------------


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` that cover ``0..size``, evenly spread, neighbours overlapping by at least
    ``overlap`` (one tile at 0 when ``size <= tile``)."""
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be at least 0 and less than the tile {tile}")
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, start: int, size: int) -> torch.Tensor:
    """Weights along one axis of a tile at ``start`` (``length`` long) in an axis of ``size``: the distance to the
    nearer of the tile's inner edges (those that cut the image; the image's own border does not count), so that a
    pixel counts most in the tile where it lies farthest from a cut. Never 0."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weights = torch.full((length,), float(length))
    if start > 0:
        weights = torch.minimum(weights, position)
    if start + length < size:
        weights = torch.minimum(weights, position.flip(0))
    return weights


def _blend(run: Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor, tile: int, overlap: int,
           step_in: int, step_out: int) -> torch.Tensor:
    """Run ``run`` on overlapping tiles of ``source`` ``[B, C, H, W]`` (tile starts in units of ``step_in``
    source pixels, ``step_out`` output pixels) and blend the results (float32, on the source's device)."""
    batch = source.shape[0]
    rows, cols = source.shape[2] // step_in, source.shape[3] // step_in
    tile_h, tile_w = min(tile, rows), min(tile, cols)
    ys, xs = tile_starts(rows, tile, overlap), tile_starts(cols, tile, overlap)
    out: torch.Tensor | None = None
    weight = torch.zeros(rows * step_out, cols * step_out, dtype=torch.float32, device=source.device)
    for item in range(batch):
        for y in ys:
            for x in xs:
                piece = source[item:item + 1, :, y * step_in:(y + tile_h) * step_in,
                               x * step_in:(x + tile_w) * step_in].contiguous()
                result = run(piece).float()
                if out is None:
                    out = torch.zeros(batch, result.shape[1], rows * step_out, cols * step_out,
                                      dtype=torch.float32, device=source.device)
                mask = torch.outer(_ramp(tile_h * step_out, y * step_out, rows * step_out),
                                   _ramp(tile_w * step_out, x * step_out, cols * step_out))
                mask = mask.to(source.device)
                region = (slice(y * step_out, (y + tile_h) * step_out), slice(x * step_out, (x + tile_w) * step_out))
                out[item, :, region[0], region[1]] += result[0] * mask
                if item == 0:
                    weight[region] += mask
                del piece, result
    assert out is not None
    return out / weight


def decode_tiled(vae: torch.nn.Module, latents: torch.Tensor, tile: int, overlap: int,
                 downscale: int = 8) -> torch.Tensor:
    """:func:`decode` tile by tile (``tile`` and ``overlap`` in latent pixels): ``[B, 3, H, W]`` float32."""
    return _blend(lambda piece: decode(vae, piece), latents, tile, overlap, 1, downscale)


def encode_tiled(vae: torch.nn.Module, pixels: torch.Tensor, tile: int, overlap: int,
                 downscale: int = 8) -> torch.Tensor:
    """:func:`encode` tile by tile (``tile`` and ``overlap`` in latent pixels; ``pixels`` a multiple of
    ``downscale`` high and wide): ``[B, C, h, w]`` float32."""
    return _blend(lambda piece: encode(vae, piece), pixels, tile, overlap, downscale, 1)


def choose_tiling(estimate: Callable[[int], Estimate], rows: int, cols: int, budget: int | None) -> Tiling | None:
    """The tile for a low-memory run over a latent of ``rows × cols``. Without a ``budget``: :data:`DEFAULT_TILE`,
    halved until it is smaller than the longer side (so that there are tiles at all). With one (bytes): the
    largest tile up to :data:`DEFAULT_TILE`, smaller than the longer side, whose ``estimate(tile)`` (one tile of
    one item) fits it. ``None`` when even :data:`MIN_TILE` does not fit. The overlap is a quarter of the tile."""
    longest = max(rows, cols)
    if budget is None:
        tile = DEFAULT_TILE
        while tile >= longest and tile > MIN_TILE:
            tile //= 2
    else:
        tile = max(MIN_TILE, min(DEFAULT_TILE, longest - 1))
        while tile > MIN_TILE and estimate(tile).nbytes > budget:
            tile -= 1
    one = estimate(tile)
    if budget is not None and one.nbytes > budget:
        return None
    overlap = max(1, tile // 4)
    tiles = len(tile_starts(rows, tile, overlap)) * len(tile_starts(cols, tile, overlap))
    return Tiling(tile=tile, overlap=overlap, tiles=tiles, estimate=one)
