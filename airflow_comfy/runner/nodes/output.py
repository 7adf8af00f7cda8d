"""SaveImage and PreviewImage: PNGs with ComfyUI's ``prompt`` and ``workflow`` text chunks and file names,
written to the artifact store (``runs/<dag>/<run>/outputs/...``)."""

from __future__ import annotations

import torch

from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.ops import save as save_ops
from airflow_comfy.runner.registry import implements


def _save(ctx: NodeContext, images: torch.Tensor, filename_prefix: str, preview: bool) -> tuple:
    existing = ctx.run.existing_outputs() if ctx.run.existing_outputs else []
    try:
        planned = save_ops.save_images(images, filename_prefix, ctx.run.prompt, ctx.run.extra_pnginfo,
                                       existing_names=existing, preview=preview)
    except save_ops.UnsafeFilenamePrefix as exc:
        raise ctx.bad_input(str(exc), "filename_prefix") from exc
    for image in planned:
        saved = ctx.run.save_image(ctx.node_id, image.subfolder, image.filename, image.data,
                                   int(images.shape[2]), int(images.shape[1]))
        ctx.progress(f"saved {saved.uri}")
    return ()


@implements("SaveImage")
def save_image(ctx: NodeContext, images: torch.Tensor, filename_prefix: str) -> tuple:
    return _save(ctx, images, filename_prefix, preview=False)


@implements("PreviewImage")
def preview_image(ctx: NodeContext, images: torch.Tensor) -> tuple:
    return _save(ctx, images, "ComfyUI", preview=True)
