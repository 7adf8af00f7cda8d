"""Image nodes: loading (confined to the input folder), scaling, inverting, batching, padding, Canny."""

from __future__ import annotations

from pathlib import Path

import torch

from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.ops import canny as canny_ops
from airflow_comfy.runner.ops import image as image_ops
from airflow_comfy.runner.registry import implements
from airflow_comfy.workflow.validate import path_escape_reason

_ANNOTATIONS = (" [input]", " [output]", " [temp]")


def input_file(ctx: NodeContext, name: str, input_name: str = "image") -> Path:
    """A LoadImage file name resolved inside the input folder; escapes and missing files are bad input."""
    reason = path_escape_reason(name)
    if reason:
        raise ctx.bad_input(f"file name {name!r} escapes the input folder: {reason}", input_name)
    for suffix in _ANNOTATIONS:
        if name.endswith(suffix):
            if suffix != " [input]":
                raise ctx.bad_input(f"{name!r}: only images of the input folder can be loaded", input_name)
            name = name[: -len(suffix)]
    root = ctx.run.input_dir.resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise ctx.bad_input(f"file name {name!r} escapes the input folder", input_name)
    if not path.is_file():
        raise ctx.bad_input(f"input image {name!r} not found in {root}", input_name)
    return path


@implements("LoadImage")
def load_image(ctx: NodeContext, image: str) -> tuple:
    path = input_file(ctx, image)
    try:
        return image_ops.load_image(path, name=image)
    except ValueError as exc:
        raise ctx.bad_input(str(exc), "image") from exc


@implements("LoadImageMask")
def load_image_mask(ctx: NodeContext, image: str, channel: str) -> tuple:
    path = input_file(ctx, image)
    try:
        return (image_ops.load_image_mask(path, channel, name=image),)
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
