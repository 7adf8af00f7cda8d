"""SaveImage / PreviewImage: file names and PNG bytes exactly as ComfyUI writes them (ComfyUI 0.3.64
``nodes.py`` ``SaveImage.save_images``, ``folder_paths.get_save_image_path``).

The runner writes to an artifact store, not a folder, so the node is split into pure parts:

* :func:`resolve_prefix`: ``filename_prefix`` → ``(subfolder, base name)`` after the ``%width%``,
  ``%height%``, ``%year%`` … ``%second%`` substitutions; refuses prefixes that leave the output folder.
* :func:`plan_filenames`: the ``(subfolder, filename)`` of each image of a batch, given the names that already
  exist (ComfyUI's counter: ``max(existing) + 1``).
* :func:`encode_png`: the PNG bytes of one ``[H, W, C]`` image, with the ``prompt`` / ``extra_pnginfo``
  ``tEXt`` chunks, unless metadata is disabled (ComfyUI's ``--disable-metadata``).
* :func:`save_images`: all of it for a batch; :func:`preview_prefix` is PreviewImage's prefix.

One difference from ComfyUI: matching existing names for the counter is case-insensitive everywhere
(ComfyUI uses ``os.path.normcase``, which folds case only on Windows). It can only make the counter higher,
never overwrite a file that ComfyUI would have kept.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import posixpath
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

SAVE_COMPRESS_LEVEL = 4
PREVIEW_COMPRESS_LEVEL = 1
PREVIEW_LETTERS = "abcdefghijklmnopqrstupvxyz"
"""ComfyUI's alphabet for PreviewImage's random suffix (sic: ``p`` twice, no ``w``)."""

_ROOT = "/output"
"""A stand-in for the output folder when checking that a prefix stays inside it."""


class UnsafeFilenamePrefix(ValueError):
    """A ``filename_prefix`` whose folder would be outside the output folder."""


@dataclass(frozen=True)
class SavedImage:
    """One written image: where it goes (``subfolder`` is ``/``-separated, ``""`` = the top) and its bytes."""

    filename: str
    subfolder: str
    type: str
    data: bytes

    def ui(self) -> dict[str, str]:
        """The entry of ComfyUI's ``{"ui": {"images": [...]}}``."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


def _time_fields(now: _dt.datetime | time.struct_time | None) -> tuple[int, int, int, int, int, int]:
    if now is None:
        now = time.localtime()
    if isinstance(now, _dt.datetime):
        return now.year, now.month, now.day, now.hour, now.minute, now.second
    return now.tm_year, now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec


def substitute_prefix(
    prefix: str, width: int, height: int, now: _dt.datetime | time.struct_time | None = None
) -> str:
    """ComfyUI's backend substitutions: ``%width% %height%`` and the local date/time (zero-padded, year as is).

    ``%batch_num%`` is left for :func:`plan_filenames`; frontend ones (``%date:…%``, ``%Node.widget%``) are
    not handled here.
    """
    if "%" not in prefix:
        return prefix
    year, month, day, hour, minute, second = _time_fields(now)
    for key, value in (
        ("%width%", str(width)),
        ("%height%", str(height)),
        ("%year%", str(year)),
        ("%month%", str(month).zfill(2)),
        ("%day%", str(day).zfill(2)),
        ("%hour%", str(hour).zfill(2)),
        ("%minute%", str(minute).zfill(2)),
        ("%second%", str(second).zfill(2)),
    ):
        prefix = prefix.replace(key, value)
    return prefix


def resolve_prefix(
    prefix: str, width: int, height: int, now: _dt.datetime | time.struct_time | None = None
) -> tuple[str, str]:
    """``(subfolder, base name)`` of a ``filename_prefix`` for images of ``width × height``.

    The prefix is substituted and normalised; everything up to the last ``/`` is the subfolder. A prefix whose
    folder is outside the output folder (``..``, absolute paths) raises :class:`UnsafeFilenamePrefix`.
    """
    substituted = substitute_prefix(prefix, width, height, now)
    normalized = posixpath.normpath(substituted)
    subfolder = posixpath.dirname(normalized)
    filename = posixpath.basename(normalized)
    folder = posixpath.normpath(posixpath.join(_ROOT, subfolder))
    if posixpath.commonpath((_ROOT, folder)) != _ROOT:
        raise UnsafeFilenamePrefix(
            f"Saving image outside the output folder is not allowed: filename_prefix {prefix!r} "
            f"points at folder {subfolder!r}")
    return subfolder, filename


def next_counter(prefix_length: int, filename: str, names_in_folder: Iterable[str]) -> int:
    """ComfyUI's counter: one more than the largest number ``N`` among names ``<filename>_<N>_…``.

    ``prefix_length`` is the length of the prefix's base name before normalisation (as ComfyUI slices the
    names with it). A matching name whose number does not parse counts as 0; no match gives 1.
    """
    best = None
    wanted = filename.lower()
    for name in names_in_folder:
        head = name[:prefix_length + 1]
        try:
            digits = int(name[prefix_length + 1:].split("_")[0])
        except ValueError:
            digits = 0
        if head and head[-1] == "_" and head[:-1].lower() == wanted:
            best = digits if best is None else max(best, digits)
    return 1 if best is None else best + 1


def plan_filenames(
    prefix: str,
    images_shape: Sequence[int],
    existing_names: Iterable[str],
    now: _dt.datetime | time.struct_time | None = None,
) -> list[tuple[str, str]]:
    """``(subfolder, filename)`` of each image of a ``[B, H, W, C]`` batch saved under ``prefix``.

    ``existing_names`` are the files already in the output store, as ``/``-separated paths relative to the
    output folder (``"ComfyUI_00001_.png"``, ``"sub/x_00003_.png"``); only those directly in the target
    subfolder count. Names are ``<base>_<counter:05>_.png`` with ``counter`` increasing per image and
    ``%batch_num%`` in the base replaced by the image's index — which also means that, as in ComfyUI, a prefix
    with ``%batch_num%`` never matches existing files and always starts again at 1.
    """
    batch, height, width = int(images_shape[0]), int(images_shape[1]), int(images_shape[2])
    subfolder, filename = resolve_prefix(prefix, width, height, now)
    prefix_length = len(posixpath.basename(substitute_prefix(prefix, width, height, now)))
    in_folder = []
    for path in existing_names:
        path = posixpath.normpath(path)
        folder = posixpath.dirname(path)
        if folder == subfolder:
            in_folder.append(posixpath.basename(path))
    counter = next_counter(prefix_length, filename, in_folder)
    return [
        (subfolder, f"{filename.replace('%batch_num%', str(index))}_{counter + index:05}_.png")
        for index in range(batch)
    ]


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``uint8(clip(255·x, 0, 255))`` in float32: truncated, not rounded (0.999 → 254)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    values = np.asarray(image, dtype=np.float32) * np.float32(255.0)
    return np.clip(values, 0, 255).astype(np.uint8)


def encode_png(
    image_hwc: torch.Tensor | np.ndarray,
    prompt: Mapping[str, Any] | None,
    extra_pnginfo: Mapping[str, Any] | None,
    compress_level: int = SAVE_COMPRESS_LEVEL,
    *,
    disable_metadata: bool = False,
) -> bytes:
    """The PNG file ComfyUI writes for one ``[H, W, C]`` image (C = 3 → RGB, 4 → RGBA, 1 → greyscale).

    Unless ``disable_metadata``: a ``tEXt`` chunk ``prompt`` = ``json.dumps(prompt)`` (when given), then one
    per key of ``extra_pnginfo`` (``json.dumps`` of the value), all before the image data.
    """
    pixels = to_uint8(image_hwc)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    picture = Image.fromarray(pixels)
    metadata = None
    if not disable_metadata:
        metadata = PngInfo()
        if prompt is not None:
            metadata.add_text("prompt", json.dumps(prompt))
        if extra_pnginfo is not None:
            for key in extra_pnginfo:
                metadata.add_text(key, json.dumps(extra_pnginfo[key]))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=metadata, compress_level=compress_level)
    return buffer.getvalue()


def preview_prefix(prefix: str = "ComfyUI", rng: random.Random | None = None) -> str:
    """PreviewImage's prefix: ``prefix + "_temp_"`` + five random letters."""
    choice = (rng or random).choice
    return prefix + "_temp_" + "".join(choice(PREVIEW_LETTERS) for _ in range(5))


def save_images(
    images: torch.Tensor,
    filename_prefix: str = "ComfyUI",
    prompt: Mapping[str, Any] | None = None,
    extra_pnginfo: Mapping[str, Any] | None = None,
    existing_names: Iterable[str] = (),
    now: _dt.datetime | time.struct_time | None = None,
    *,
    preview: bool = False,
    disable_metadata: bool = False,
    rng: random.Random | None = None,
) -> list[SavedImage]:
    """SaveImage (``type`` ``output``, compression 4) or, with ``preview``, PreviewImage (``temp``, level 1,
    ``filename_prefix`` + ``_temp_`` + random letters) for a whole ``[B, H, W, C]`` batch."""
    if preview:
        filename_prefix = preview_prefix(filename_prefix, rng)
    kind = "temp" if preview else "output"
    level = PREVIEW_COMPRESS_LEVEL if preview else SAVE_COMPRESS_LEVEL
    names = plan_filenames(filename_prefix, tuple(images.shape), existing_names, now)
    return [
        SavedImage(filename=filename, subfolder=subfolder, type=kind,
                   data=encode_png(image, prompt, extra_pnginfo, level, disable_metadata=disable_metadata))
        for image, (subfolder, filename) in zip(images, names, strict=True)
    ]


__all__ = [
    "PREVIEW_COMPRESS_LEVEL",
    "SAVE_COMPRESS_LEVEL",
    "SavedImage",
    "UnsafeFilenamePrefix",
    "encode_png",
    "next_counter",
    "plan_filenames",
    "preview_prefix",
    "resolve_prefix",
    "save_images",
    "substitute_prefix",
    "to_uint8",
]
