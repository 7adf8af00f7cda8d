"""Image nodes: loading (from the input folder or the input store), scaling, inverting, batching, padding, Canny."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from airflow_comfy.artifacts.errors import ArtifactNotFound
from airflow_comfy.artifacts.store import split_uri
from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.ops import canny as canny_ops
from airflow_comfy.runner.ops import image as image_ops
from airflow_comfy.runner.registry import implements
from airflow_comfy.workflow.inputs import InputImage, InputImageError, locate_input_image


def locate_input(ctx: NodeContext, value: str, input_name: str = "image") -> InputImage:
    """Where a LoadImage value points (a name in the input folder, a file:// URI inside it, an s3:// object of
    the input store); anything else is bad input with the sentence why (:mod:`airflow_comfy.workflow.inputs`)."""
    try:
        return locate_input_image(value, ctx.run.input_roots)
    except InputImageError as exc:
        raise ctx.bad_input(str(exc), input_name) from None


def input_file(ctx: NodeContext, name: str, input_name: str = "image") -> Path:
    """A name inside the input folder resolved to its file (links may not lead out of the folder); a missing
    file is bad input."""
    root = ctx.run.input_dir.resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise ctx.bad_input(f"file name {name!r} escapes the input folder", input_name)
    if not path.is_file():
        raise ctx.bad_input(f"input image {name!r} not found in {root}", input_name)
    return path


def check_input(ctx: NodeContext, value: str, input_name: str = "image") -> None:
    """Before any node runs: the input image is there (a file in the folder, an object in the store)."""
    image = locate_input(ctx, value, input_name)
    if image.name is not None:
        input_file(ctx, image.name, input_name)
        return
    store, key = split_uri(image.uri)
    if not store.exists(key):
        raise ctx.bad_input(f"input image {image.uri!r} not found in the input store", input_name)


def read_input(ctx: NodeContext, value: str, input_name: str = "image") -> io.BytesIO:
    """The bytes of an input image, read once; its sha256 goes into the run snapshot (``inputs``)."""
    image = locate_input(ctx, value, input_name)
    if image.name is not None:
        data = input_file(ctx, image.name, input_name).read_bytes()
    else:
        store, key = split_uri(image.uri)
        try:
            data = store.get_bytes(key)
        except ArtifactNotFound:
            raise ctx.bad_input(f"input image {image.uri!r} not found in the input store", input_name) from None
    ctx.run.input_files[value] = hashlib.sha256(data).hexdigest()
    return io.BytesIO(data)


@implements("LoadImage")
def load_image(ctx: NodeContext, image: str) -> tuple:
    source = read_input(ctx, image)
    try:
        return image_ops.load_image(source, name=image)
    except ValueError as exc:
        raise ctx.bad_input(str(exc), "image") from exc


@implements("LoadImageMask")
def load_image_mask(ctx: NodeContext, image: str, channel: str) -> tuple:
    source = read_input(ctx, image)
    try:
        return (image_ops.load_image_mask(source, channel, name=image),)
    except ValueError as exc:
        raise ctx.bad_input(str(exc), "image") from exc


@implements("ImageScale")
def image_scale(ctx: NodeContext, image: torch.Tensor, upscale_method: str, width: int, height: int,
                crop: str) -> tuple:
    return (image_ops.image_scale(image, upscale_method, width, height, crop),)


@implements("ImageScaleBy")
def image_scale_by(ctx: NodeContext, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple:
    return (image_ops.image_scale_by(image, upscale_method, scale_by),)


@implements("ImageScaleToTotalPixels")
def image_scale_to_total_pixels(ctx: NodeContext, image: torch.Tensor, upscale_method: str,
                                megapixels: float) -> tuple:
    return (image_ops.image_scale_to_total_pixels(image, upscale_method, megapixels),)


@implements("ImageInvert")
def image_invert(ctx: NodeContext, image: torch.Tensor) -> tuple:
    return (image_ops.image_invert(image),)


@implements("ImageBatch")
def image_batch(ctx: NodeContext, image1: torch.Tensor, image2: torch.Tensor) -> tuple:
    try:
        return (image_ops.image_batch(image1, image2),)
    except ValueError as exc:
        raise ctx.bad_input(str(exc), "image2") from exc


@implements("ImagePadForOutpaint")
def image_pad_for_outpaint(ctx: NodeContext, image: torch.Tensor, left: int, top: int, right: int, bottom: int,
                           feathering: int) -> tuple:
    return image_ops.image_pad_for_outpaint(image, left, top, right, bottom, feathering)


@implements("Canny")
def canny(ctx: NodeContext, image: torch.Tensor, low_threshold: float, high_threshold: float) -> tuple:
    return (canny_ops.canny(image, low_threshold, high_threshold),)


@implements("ImageUpscaleWithModel")
def image_upscale_with_model(ctx: NodeContext, upscale_model, image: torch.Tensor) -> tuple:
    from airflow_comfy.runner.models.esrgan import upscale_image

    return (upscale_image(upscale_model.model, image.to(ctx.device)).cpu(),)
