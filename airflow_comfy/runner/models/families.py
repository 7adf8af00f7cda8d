"""Which Stable Diffusion family a single file holds: ``sd1`` (SD 1.x), ``sdxl`` (SDXL base: CLIP-L + OpenCLIP
bigG), ``sdxl_refiner`` (bigG only). SD 2.x, SD3, Flux and other families are refused with a clear message."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.config import LATENT_SCALE, embedded_config
from airflow_comfy.runner.models.files import ModelFileError


def detect_family(keys: Iterable[str], shape: Callable[[str], tuple[int, ...]] | None = None,
                  metadata: Mapping[str, str] | None = None, *, label: str = "checkpoint") -> str:
    """``sd1``, ``sdxl`` or ``sdxl_refiner`` from a single file's key names (and shapes when needed)."""
    embedded = embedded_config(metadata or {})
    if embedded and embedded.get("family") in LATENT_SCALE:
        return embedded["family"]
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(layout.SDXL_CLIP_G_PREFIX):
        return "sdxl"
    if has(layout.REFINER_CLIP_G_PREFIX):
        return "sdxl_refiner"
    if has(layout.SDXL_CLIP_L_PREFIX):
        return "sdxl"
    if has("cond_stage_model.model."):
        raise ModelFileError(f"{label}: SD 2.x checkpoints (OpenCLIP-H text encoder) are not supported yet")
    if has(layout.SD1_CLIP_PREFIX):
        return "sd1"
    if has(layout.UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        raise ModelFileError(f"{label}: Flux models are not supported (only SD 1.x and SDXL checkpoints)")
    if has(layout.UNET_PREFIX + "joint_blocks.") or has("joint_blocks."):
        raise ModelFileError(f"{label}: SD3 models are not supported (only SD 1.x and SDXL checkpoints)")
    if has(layout.UNET_PREFIX + "input_blocks."):
        if layout.UNET_PREFIX + "label_emb.0.0.weight" in keys:
            return "sdxl"
        if shape is not None:
            cross = next((shape(k)[1] for k in keys if k.endswith("attn2.to_k.weight")), None)
            if cross == 1024:
                raise ModelFileError(f"{label}: SD 2.x checkpoints are not supported yet")
        return "sd1"
    if has(layout.VAE_PREFIX):
        return "sd1"
    raise ModelFileError(f"{label}: not a Stable Diffusion 1.x/SDXL checkpoint (no model.diffusion_model.*, "
                         f"first_stage_model.* or text-encoder keys; first keys: {', '.join(sorted(keys)[:3])})")
