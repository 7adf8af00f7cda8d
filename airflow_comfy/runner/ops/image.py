"""Image operations of the core nodes (ComfyUI 0.3.64 ``nodes.py``, ``comfy_extras/nodes_post_processing.py``
for ImageScaleToTotalPixels, ``comfy/utils.py`` ``common_upscale``), pure torch / PIL, no model.

Shapes follow ComfyUI: IMAGE ``[B, H, W, C]`` float 0..1 (channels last), MASK ``[B, H, W]`` (1 = area to
change). :func:`common_upscale` works channels first (``[B, C, H, W]``), as ComfyUI's does, so that latents
and images share it.

Known differences from ComfyUI 0.3.64 (everything else is meant to match value for value):

* :func:`load_image` / :func:`load_image_mask` also scale 16-bit greyscale (``I;16`` family: how Pillow ≥ 10
  opens 16-bit PNGs) by 1/255 like mode ``I``; ComfyUI scales only mode ``I`` and clips ``I;16`` to white.
* :func:`load_image`: when the frames of a multi-frame file disagree on having transparency, the frames
  without it get a full-size zero mask instead of the 64×64 placeholder (ComfyUI fails to batch the masks).
* ``lanczos`` on an image that is not 3 or 4 channels resizes each channel as an 8-bit greyscale picture
  (ComfyUI's PIL conversion only works for RGB / RGBA).
* :func:`image_batch` with different channel counts raises a clear error (ComfyUI fails in ``torch.cat``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, ImageSequence

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos", "bislerp")
CROP_METHODS = ("disabled", "center")
MASK_CHANNELS = ("alpha", "red", "green", "blue")

_EXCLUDED_MULTI_FRAME_FORMATS = ("MPO",)
"""Multi-frame formats whose extra frames are not batched (MPO: the extra frames are previews/depth)."""


class ImageLoadError(ValueError):
    """An input image could not be read; the message names the file."""


# --- resizing -------------------------------------------------------------------------------------


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Resize ``samples [B, C, H, W]`` to ``height × width`` (ComfyUI's ``comfy.utils.common_upscale``).

    ``crop="center"`` first cuts the source to the target aspect ratio (equal margins, rounded to whole
    pixels). ``nearest-exact``, ``bilinear``, ``area`` and ``bicubic`` are :func:`torch.nn.functional.interpolate`
    with its defaults (``align_corners=False``, no antialiasing; ``area`` is adaptive average pooling);
    ``lanczos`` goes through 8-bit PIL images; ``bislerp`` is :func:`bislerp`.
    """
    if samples.ndim != 4:
        raise ValueError(f"common_upscale expects [B, C, H, W], got shape {tuple(samples.shape)}")
    if method not in UPSCALE_METHODS:
        raise ValueError(f"unknown upscale method {method!r}; expected one of {', '.join(UPSCALE_METHODS)}")
    if crop not in CROP_METHODS:
        raise ValueError(f"unknown crop {crop!r}; expected one of {', '.join(CROP_METHODS)}")
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"target size must be at least 1×1, got {width}×{height}")

    source = samples
    if crop == "center":
        old_height, old_width = samples.shape[-2], samples.shape[-1]
        old_aspect = old_width / old_height
        new_aspect = width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        source = samples.narrow(-2, y, old_height - 2 * y).narrow(-1, x, old_width - 2 * x)

    if method == "bislerp":
        return bislerp(source, width, height)
    if method == "lanczos":
        return lanczos(source, width, height)
    if method in ("bilinear", "bicubic"):
        return F.interpolate(source, size=(height, width), mode=method, align_corners=False)
    return F.interpolate(source, size=(height, width), mode=method)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL's Lanczos resize of each image of ``samples [B, C, H, W]`` (values go through ``uint8``, truncated)."""
    out = []
    for item in samples:
        pixels = np.clip(255.0 * item.movedim(0, -1).detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
        channels = pixels.shape[-1]
        if channels in (3, 4):
            picture = Image.fromarray(pixels, mode="RGB" if channels == 3 else "RGBA")
            resized = np.asarray(picture.resize((width, height), resample=Image.Resampling.LANCZOS))
        else:
            planes = [
                np.asarray(Image.fromarray(pixels[..., c], mode="L").resize(
                    (width, height), resample=Image.Resampling.LANCZOS))
                for c in range(channels)
            ]
            resized = np.stack(planes, axis=-1)
        out.append(torch.from_numpy(resized.astype(np.float32) / 255.0).movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


def _sample_positions(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``new`` output positions along an axis of length ``old``: the two source neighbours and the
    fraction towards the second, at the sample positions of a half-pixel-centred (``align_corners=False``)
    bilinear resize, clamped at the edges.

    The positions are taken from torch's own bilinear resize of a coordinate ramp, so they are exactly the
    ones ``interpolate(mode="bilinear")`` uses (same float32 rounding).
    """
    ramp = torch.arange(old, dtype=torch.float32).reshape(1, 1, 1, old)
    position = F.interpolate(ramp, size=(1, new), mode="bilinear", align_corners=False).reshape(new)
    first = position.to(torch.int64)
    fraction = position - position.floor()
    # The upper neighbour: the next source index, except at the last one (clamped).
    upper_ramp = ramp + 1
    upper_ramp[..., -1] -= 1
    second = F.interpolate(upper_ramp, size=(1, new), mode="bilinear", align_corners=False)
    second = second.reshape(new).to(torch.int64)
    return first, second, fraction


def _slerp_vectors(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between the rows of ``a`` and ``b`` (``[N, C]``) by ``t`` (``[N, 1]``).

    Directions are slerped on the unit sphere and the length is interpolated linearly. Zero vectors have a
    zero direction; (nearly) parallel rows give ``a`` and (nearly) opposite rows a plain lerp.
    """
    norm_a = a.norm(dim=-1, keepdim=True)
    norm_b = b.norm(dim=-1, keepdim=True)
    unit_a = torch.where(norm_a == 0, torch.zeros_like(a), a / norm_a)
    unit_b = torch.where(norm_b == 0, torch.zeros_like(b), b / norm_b)
    cos = (unit_a * unit_b).sum(dim=-1)
    omega = torch.acos(cos)
    sin_omega = torch.sin(omega)
    weight_a = (torch.sin((1.0 - t[:, 0]) * omega) / sin_omega).unsqueeze(1)
    weight_b = (torch.sin(t[:, 0] * omega) / sin_omega).unsqueeze(1)
    out = (weight_a * unit_a + weight_b * unit_b) * (norm_a * (1.0 - t) + norm_b * t)
    parallel = (cos > 1 - 1e-5).unsqueeze(1)
    opposite = (cos < 1e-5 - 1).unsqueeze(1)
    out = torch.where(parallel, a, out)
    return torch.where(opposite, a * (1.0 - t) + b * t, out)


def _bislerp_axis(samples: torch.Tensor, new: int, dim: int) -> torch.Tensor:
    """Resize one spatial axis (``dim`` = -1 width, -2 height) of ``[B, C, H, W]`` by slerping channel vectors."""
    first, second, fraction = _sample_positions(samples.shape[dim], new)
    a = samples.index_select(dim, first)
    b = samples.index_select(dim, second)
    shape = [1, 1, 1, 1]
    shape[dim] = new
    t = fraction.reshape(shape).expand_as(a[:, :1])
    channels = samples.shape[1]
    flat = [x.movedim(1, -1).reshape(-1, x.shape[1]) for x in (a, b, t)]
    out = _slerp_vectors(*flat)
    return out.reshape(*a.movedim(1, -1).shape[:-1], channels).movedim(-1, 1)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize of latents ``[B, C, H, W]`` where each 1-D interpolation is a slerp of the C-vectors.

    Width first, then height, at the sample positions of torch's bilinear resize (``align_corners=False``).
    Computed in float32 and returned in the input dtype.
    """
    dtype = samples.dtype
    out = _bislerp_axis(samples.float(), int(width), dim=-1)
    out = _bislerp_axis(out, int(height), dim=-2)
    return out.to(dtype)


# --- loading --------------------------------------------------------------------------------------


def _describe(path: str | os.PathLike[str] | BinaryIO, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return str(getattr(path, "name", "<stream>"))


@contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _read(path, name: str | None, reader):
    """Run ``reader(opened_image)``; like ComfyUI, retry once accepting truncated files, then fail clearly."""
    label = _describe(path, name)
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise ImageLoadError(f"Invalid image file: {label}: no such file")

    def attempt():
        if not isinstance(path, (str, os.PathLike)):
            path.seek(0)
        with Image.open(path) as picture:
            return reader(picture)

    try:
        return attempt()
    except (OSError, UnicodeDecodeError, ValueError, SyntaxError):
        try:
            with _truncated_images_allowed():
                return attempt()
        except (OSError, UnicodeDecodeError, ValueError, SyntaxError) as exc:
            raise ImageLoadError(f"Invalid image file: {label}: {exc}") from exc


def _scale_integer_mode(picture: Image.Image) -> Image.Image:
    """Mode ``I`` (and the 16-bit ``I;16`` family, see the module notes) divided by 255, as ComfyUI does."""
    if picture.mode.startswith("I;16"):
        picture = picture.convert("I")
    if picture.mode == "I":
        picture = picture.point(lambda value: value * (1 / 255))
    return picture


def _frames(picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    size = None
    for frame in ImageSequence.Iterator(picture):
        frame = ImageOps.exif_transpose(frame)
        frame = _scale_integer_mode(frame)
        rgb = frame.convert("RGB")
        if size is None:
            size = rgb.size
        if rgb.size != size:
            continue
        images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
        if "A" in frame.getbands():
            alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
            mask = 1.0 - torch.from_numpy(alpha)
        elif frame.mode == "P" and "transparency" in frame.info:
            alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
            mask = 1.0 - torch.from_numpy(alpha)
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        masks.append(mask[None])
        if picture.format in _EXCLUDED_MULTI_FRAME_FORMATS:
            break
    if not images:
        raise ValueError("the file has no frames")
    if len(images) == 1:
        return images[0], masks[0]
    if len({tuple(m.shape) for m in masks}) > 1:
        height, width = images[0].shape[1:3]
        masks = [m if m.shape[1:] == (height, width) else torch.zeros((1, height, width)) for m in masks]
    return torch.cat(images), torch.cat(masks)


def load_image(
    path: str | os.PathLike[str] | BinaryIO, *, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoadImage: ``(IMAGE [B, H, W, 3], MASK [B, h, w])`` from an image file.

    EXIF orientation is applied; the frames of a multi-frame file that have the first frame's size are batched
    (not for MPO); mode ``I`` pixels are divided by 255 first; the image is RGB / 255. The mask is
    ``1 − alpha`` (or the palette transparency), else a 64×64 zero mask. Unreadable files raise
    :class:`ImageLoadError` naming the file (``name``, when given, is used in messages instead of the path).
    """
    return _read(path, name, _frames)


def load_image_mask(
    path: str | os.PathLike[str] | BinaryIO, channel: str, *, name: str | None = None
) -> torch.Tensor:
    """LoadImageMask: ``MASK [1, H, W]`` from one channel of the first frame; ``alpha`` is inverted (1 − A)."""
    if channel not in MASK_CHANNELS:
        raise ValueError(f"unknown mask channel {channel!r}; expected one of {', '.join(MASK_CHANNELS)}")
    band = channel[0].upper()

    def reader(picture: Image.Image) -> torch.Tensor:
        frame = ImageOps.exif_transpose(picture)
        if frame.getbands() != ("R", "G", "B", "A"):
            frame = _scale_integer_mode(frame).convert("RGBA")
        values = torch.from_numpy(np.array(frame.getchannel(band)).astype(np.float32) / 255.0)
        if band == "A":
            values = 1.0 - values
        return values[None]

    return _read(path, name, reader)


# --- node operations ------------------------------------------------------------------------------


def image_scale(image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str) -> torch.Tensor:
    """ImageScale: resize to ``width × height``; one of them 0 keeps the aspect ratio, both 0 is a no-op."""
    if width == 0 and height == 0:
        return image
    samples = image.movedim(-1, 1)
    if width == 0:
        width = max(1, round(samples.shape[3] * height / samples.shape[2]))
    elif height == 0:
        height = max(1, round(samples.shape[2] * width / samples.shape[3]))
    return common_upscale(samples, width, height, upscale_method, crop).movedim(1, -1)


def image_scale_by(image: torch.Tensor, upscale_method: str, scale_by: float) -> torch.Tensor:
    """ImageScaleBy: ``round(w·s) × round(h·s)``, no crop."""
    samples = image.movedim(-1, 1)
    width = round(samples.shape[3] * scale_by)
    height = round(samples.shape[2] * scale_by)
    return common_upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1)


def total_pixels_size(width: int, height: int, megapixels: float) -> tuple[int, int]:
    """The ``(width, height)`` ImageScaleToTotalPixels resizes to: ``s = sqrt(int(mp·2²⁰) / (w·h))``, rounded."""
    total = int(megapixels * 1024 * 1024)
    scale = math.sqrt(total / (width * height))
    return round(width * scale), round(height * scale)


def image_scale_to_total_pixels(image: torch.Tensor, upscale_method: str, megapixels: float) -> torch.Tensor:
    """ImageScaleToTotalPixels: keep the aspect ratio, aim at ``megapixels × 1024²`` pixels."""
    samples = image.movedim(-1, 1)
    width, height = total_pixels_size(samples.shape[3], samples.shape[2], megapixels)
    return common_upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1)


def image_invert(image: torch.Tensor) -> torch.Tensor:
    """ImageInvert: ``1 − image``."""
    return 1.0 - image


def image_batch(image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
    """ImageBatch: ``image1`` then ``image2``, resized (bilinear, centre crop) to ``image1``'s size if needed."""
    if image1.shape[-1] != image2.shape[-1]:
        raise ValueError(
            f"ImageBatch: the images have {image1.shape[-1]} and {image2.shape[-1]} channels; "
            "they must have the same number")
    if image1.shape[1:] != image2.shape[1:]:
        image2 = common_upscale(
            image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear", "center").movedim(1, -1)
    return torch.cat((image1, image2), dim=0)


def outpaint_feather_mask(
    height: int, width: int, left: int, top: int, right: int, bottom: int, feathering: int
) -> torch.Tensor:
    """The ``[height, width]`` mask ImagePadForOutpaint puts over the *original* pixels.

    ``d`` is the distance to the nearest side that gets padding (rows counted ``i`` from the top but
    ``height − i`` from the bottom, columns likewise, so the last row/column is at distance 1, the first at
    0); where ``d < feathering`` the value is ``((feathering − d) / feathering)²``, elsewhere 0. No feathering
    at all unless ``2·feathering`` is smaller than both sides of the image.
    """
    if not (feathering > 0 and feathering * 2 < height and feathering * 2 < width):
        return torch.zeros((height, width), dtype=torch.float32)
    rows = torch.arange(height, dtype=torch.int64)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.int64)[None, :].expand(height, width)
    distances = [
        rows if top != 0 else torch.full_like(rows, height),
        height - rows if bottom != 0 else torch.full_like(rows, height),
        cols if left != 0 else torch.full_like(cols, width),
        width - cols if right != 0 else torch.full_like(cols, width),
    ]
    d = torch.stack(distances).amin(dim=0)
    v = (feathering - d).double() / feathering
    return torch.where(d < feathering, v * v, torch.zeros_like(v)).float()


def image_pad_for_outpaint(
    image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ImagePadForOutpaint: ``(IMAGE, MASK [1, H', W'])``: the padding is 0.5 grey with mask 1, the original
    region keeps its pixels with the feathered mask of :func:`outpaint_feather_mask`."""
    batch, height, width, channels = image.shape
    new_height, new_width = height + top + bottom, width + left + right
    padded = torch.full((batch, new_height, new_width, channels), 0.5, dtype=torch.float32)
    padded[:, top:top + height, left:left + width, :] = image
    mask = torch.ones((new_height, new_width), dtype=torch.float32)
    mask[top:top + height, left:left + width] = outpaint_feather_mask(
        height, width, left, top, right, bottom, feathering)
    return padded, mask.unsqueeze(0)


__all__ = [
    "CROP_METHODS",
    "MASK_CHANNELS",
    "UPSCALE_METHODS",
    "ImageLoadError",
    "bislerp",
    "common_upscale",
    "image_batch",
    "image_invert",
    "image_pad_for_outpaint",
    "image_scale",
    "image_scale_by",
    "image_scale_to_total_pixels",
    "lanczos",
    "load_image",
    "load_image_mask",
    "outpaint_feather_mask",
    "total_pixels_size",
]
