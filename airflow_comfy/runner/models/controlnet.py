"""ControlNetLoader and what ControlNetApply needs at sampling time.

Files: LDM layout (``control_model.*`` keys, or the same keys without the prefix) is read with
:mod:`.layout`'s UNet plan (the ControlNet's own parameter names -> LDM names); diffusers layout (``controlnet_cond_embedding.*``, ``down_blocks.*``) loads
as is. The config comes from an embedded ``__metadata__`` config (our writer) or from the tensor shapes (see
:mod:`.checkpoint`). T2I-Adapters and control LoRAs are recognised and refused ("not supported yet").

:func:`control_residuals` runs the ControlNet for one model call the way ComfyUI does: the hint IMAGE
``[B,H,W,C]`` (0..1) becomes ``[B,C,H,W]``, is centre-cropped to the latent's aspect ratio and resized
(nearest-exact) to the latent size × 8, repeated to the batch, and the residuals are scaled by ``strength``.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.building import from_ldm, materialize
from airflow_comfy.runner.models.cache import ModelCache
from airflow_comfy.runner.models.config import embedded_config
from airflow_comfy.runner.models.files import (
    ModelFileError,
    _label,
    file_key,
    read_by_layout,
    record_model_file,
    resolve_model_file,
)
from airflow_comfy.runner.ops.image import common_upscale
from airflow_comfy.runner.values import ControlNet, Recipe

_CACHE: ModelCache[ControlNet] = ModelCache(4)


def controlnet_layout(keys: list[str]) -> tuple[str, str]:
    """``("ldm" | "diffusers", prefix)``; raises for T2I-adapters, control LoRAs and unknown files."""
    keyset = set(keys)
    if any(k.startswith("adapter.") for k in keys) or any(
            re.search(r"(^|\.)body\.\d+\.(resnets\.\d+\.block1|block1)\.", k) for k in keys):
        raise ModelFileError("this is a T2I-Adapter: T2I-Adapters are not supported yet")
    if "lora_controlnet" in keyset:
        raise ModelFileError("this is a Control-LoRA: Control-LoRAs are not supported yet")
    if any(k.startswith("control_model.") for k in keys):
        return "ldm", "control_model."
    if "input_hint_block.0.weight" in keyset:
        return "ldm", ""
    if "controlnet_cond_embedding.conv_in.weight" in keyset:
        return "diffusers", ""
    raise ModelFileError("not a ControlNet (no control_model.*, input_hint_block.* or controlnet_cond_embedding.* "
                         "keys)")


def _family_of(shapes: dict[str, tuple[int, ...]]) -> str:
    cross = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if "label_emb.0.0.weight" in shapes or cross == 2048:
        return "sdxl"
    return "sd2" if cross == 1024 else "sd1"  # SD 2.x ControlNets: 64-wide heads, not SD 1.x's 8 heads


def load_controlnet_file(path: str | os.PathLike[str], *, name: str | None = None, allow_pickle: bool = False,
                         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         use_cache: bool = True) -> ControlNet:
    """A ControlNet file -> :class:`ControlNet` holding a diffusers ``ControlNetModel``."""
    from diffusers import ControlNetModel

    p = Path(path)
    label = _label(p)
    name = name or p.name
    key = (file_key(p), str(device), str(dtype), allow_pickle)
    cached = _CACHE.get(key) if use_cache else None
    if cached is not None:
        return replace(cached, recipe=Recipe("ControlNetLoader", name))
    kind, raw, metadata = read_by_layout(p, label, controlnet_layout, allow_pickle=allow_pickle)
    embedded = embedded_config(metadata) or {}
    if kind == "ldm":
        shapes = {k: tuple(v.shape) for k, v in raw.items()}
    else:
        shapes = {ldm: tuple(raw[k].shape) for k, ldm in layout.unet_key_map(raw).items()}
    family = embedded.get("family") or _family_of(shapes)
    config = (embedded.get("configs") or {}).get("controlnet") or layout.controlnet_config_from_ldm(
        shapes, family=family)
    if family == "sdxl" and config.get("addition_embed_type") == "text_time":
        config.setdefault("addition_time_embed_dim", 256)
    def factory() -> torch.nn.Module:
        return ControlNetModel.from_config(dict(config))

    if kind == "ldm":
        model = from_ldm(factory, layout.LdmSource.of(raw), layout.unet_plan, what="ControlNet", label=label,
                         device=device, dtype=dtype)
    else:
        model = materialize(factory, raw, what="ControlNet", label=label, device=device, dtype=dtype)
    control = ControlNet(model=model, recipe=Recipe("ControlNetLoader", name), kind="controlnet")
    if use_cache:
        _CACHE.put(key, control)
    return replace(control)


def load_control_net(context: Any, recipe_or_name: Recipe | str) -> ControlNet:
    """ControlNetLoader for a run (also how a CONDITIONING's serialized ControlNet recipe is re-materialized):
    the file in ``<models_root>/controlnet``, on the run's device and dtype."""
    name = recipe_or_name.file if isinstance(recipe_or_name, Recipe) else recipe_or_name
    path = resolve_model_file(Path(context.models_root), "controlnet", name)
    record_model_file(context, "controlnet", name, path)
    return load_controlnet_file(path, name=name, allow_pickle=bool(getattr(context, "allow_pickle", False)),
                                device=getattr(context, "device", "cpu"),
                                dtype=getattr(context, "dtype", torch.float32) or torch.float32)


# --- hints and residuals ----------------------------------------------------------------------------------------


def repeat_to_batch(images: torch.Tensor, batch: int, batched_number: int = 1) -> torch.Tensor:
    """Fit a hint batch to the model batch: one image is repeated; several are cycled to ``batch //
    batched_number`` and that block repeated ``batched_number`` times (cond/uncond halves)."""
    current = images.shape[0]
    if current == batch:
        return images
    if current == 1:
        return images.expand(batch, *images.shape[1:]).contiguous()
    per = max(1, batch // max(1, batched_number))
    block = images[:per]
    if per > block.shape[0]:
        reps = per // block.shape[0]
        block = torch.cat([block] * reps + [block[: per % block.shape[0]]], dim=0)
    if block.shape[0] == batch:
        return block
    return torch.cat([block] * max(1, batch // block.shape[0]), dim=0)


def prepare_hint(hint_image: torch.Tensor, width: int, height: int, batch: int, *, batched_number: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` -> ``[batch, C, height, width]``: centre crop + nearest-exact resize + batch fit."""
    if hint_image.ndim != 4:
        raise ValueError(f"a ControlNet hint must be an IMAGE [B,H,W,C], got shape {tuple(hint_image.shape)}")
    hint = hint_image.movedim(-1, 1).float()
    if hint.shape[-2:] != (height, width):
        hint = common_upscale(hint, width, height, "nearest-exact", "center")
    hint = repeat_to_batch(hint, batch, batched_number)
    # Contiguous NCHW whatever the IMAGE's strides: an IMAGE read from the artifact store is contiguous [B,H,W,C]
    # (so its NCHW view is channels-last), Canny's output is a view of a contiguous NCHW tensor. Convolutions pick
    # their kernels by memory format, and the bits differ: without this, sliced runs differ from unsliced ones.
    return hint.to(device=device or hint.device, dtype=dtype).contiguous()


def control_residuals(control_net: ControlNet, x_in: torch.Tensor, t: torch.Tensor | float,
                      encoder_hidden_states: torch.Tensor, hint_image: torch.Tensor, strength: float, *,
                      added_cond_kwargs: dict[str, torch.Tensor] | None = None, batched_number: int = 1,
                      compression: int = 8) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(down_block_res_samples, mid_block_res_sample)`` for the UNet's ``down_block_additional_residuals`` /
    ``mid_block_additional_residual``, scaled by ``strength``. ``x_in`` is the UNet's input (latent × c_in)."""
    if control_net.kind != "controlnet":
        raise ModelFileError(f"controlnet/{control_net.recipe.file}: {control_net.kind} is not supported yet")
    model = control_net.model
    param = next(model.parameters())
    batch, _, h, w = x_in.shape
    hint = prepare_hint(hint_image, w * compression, h * compression, batch, batched_number=batched_number,
                        dtype=param.dtype, device=param.device)
    timestep = t if isinstance(t, torch.Tensor) else torch.tensor(float(t))
    down, mid = model(x_in.to(param.dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(param.dtype),
                      controlnet_cond=hint, conditioning_scale=float(strength), added_cond_kwargs=added_cond_kwargs,
                      return_dict=False)
    return tuple(down), mid
