"""Single-file (ComfyUI/LDM layout) checkpoints.

Files are read with ``safetensors.safe_open``, and only the tensors of the requested components
(``components`` ⊆ ``{"MODEL", "CLIP", "VAE"}``): a group that only decodes reads only ``first_stage_model.*``.
The LDM tensors are converted with diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), except SD 2.x's
OpenCLIP ViT-H, which :func:`.layout.open_clip_from_ldm` converts with all its 24 layers and its projection (as
ComfyUI keeps them); the modules are built from the configs of :mod:`.config` (see there where they come from).
Which family and variant a file holds is :mod:`.families`' business (refusals come before any tensor is read).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.building import build_text_encoder, build_unet, build_vae
from airflow_comfy.runner.models.config import (
    LATENT_SCALE,
    _clip_config,
    _unet_config,
    _vae_config,
    embedded_config,
    shipped_config,
)
from airflow_comfy.runner.models.families import detect_family, detect_prediction
from airflow_comfy.runner.models.files import ModelFileError, TensorReader, _label
from airflow_comfy.runner.models.loaded import LoadedCheckpoint
from airflow_comfy.runner.models.tokenizers import _token_text, load_tokenizer
from airflow_comfy.runner.values import DiffusionModel, Recipe, TextEncoder, VAEModel


def _strip(prefix: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def _read_prefixed(reader: TensorReader, prefix: str) -> dict[str, torch.Tensor]:
    return reader.read(prefix)


class _ShapeOnly:
    """Stands in for a text model in diffusers' open-clip converter (it only reads ``config.hidden_size``)."""

    def __init__(self, hidden_size: int) -> None:
        self.config = type("Config", (), {"hidden_size": hidden_size})()


def _convert_clip_l(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return layout.hf_clip_keys(convert_ldm_clip_checkpoint(dict(raw)))


def _convert_clip_g(raw: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    hidden = raw[prefix + "token_embedding.weight"].shape[1]
    converted = convert_open_clip_checkpoint(_ShapeOnly(hidden), dict(raw), prefix=prefix)
    return {k: v for k, v in converted.items() if v is not None}


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _load_single_file(path: Path, components: frozenset[str], *, name: str, models_root: Path | None,
                      allow_pickle: bool, device: torch.device | str, dtype: torch.dtype,
                      vae_dtype: torch.dtype) -> LoadedCheckpoint:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    label = _label(path)
    with TensorReader(path, allow_pickle=allow_pickle) as reader:
        family = detect_family(reader.keys, reader.shape, reader.metadata, label=label)
        embedded = embedded_config(reader.metadata) or {}
        configs = embedded.get("configs", {})
        recipe = Recipe("CheckpointLoaderSimple", name)
        model = clip = vae = None

        if "MODEL" in components:
            unet_keys = [k for k in reader.keys if k.startswith(layout.UNET_PREFIX)]
            if not unet_keys:
                raise ModelFileError(f"{label}: the checkpoint has no diffusion model (model.diffusion_model.*)")
            config = configs.get("unet") or _unet_config(
                {k[len(layout.UNET_PREFIX):]: reader.shape(k) for k in unet_keys}, family)
            raw = _read_prefixed(reader, layout.UNET_PREFIX)
            prediction = detect_prediction(family, raw, in_channels=int(config["in_channels"]),
                                           prefix=layout.UNET_PREFIX, v_pred_key="v_pred" in reader,
                                           embedded=embedded.get("prediction"))
            converted = convert_ldm_unet_checkpoint(raw, config)
            del raw
            unet = build_unet(config, converted, label=label, device=device, dtype=dtype)
            del converted
            model = DiffusionModel(unet=unet, family=family, latent_scale=LATENT_SCALE[family], recipe=recipe,
                                   prediction=prediction)

        if "VAE" in components:
            vae_keys = [k for k in reader.keys if k.startswith(layout.VAE_PREFIX)]
            if not vae_keys:
                raise ModelFileError(f"{label}: the checkpoint has no VAE (first_stage_model.*)")
            config = configs.get("vae") or _vae_config(
                {k[len(layout.VAE_PREFIX):]: reader.shape(k) for k in vae_keys}, family)
            raw = _read_prefixed(reader, layout.VAE_PREFIX)
            converted = convert_ldm_vae_checkpoint(raw, config)
            del raw
            module = build_vae(config, converted, label=label, device=device, dtype=vae_dtype)
            vae = VAEModel(vae=module, latent_scale=float(config.get("scaling_factor", LATENT_SCALE[family])),
                           recipe=recipe)

        if "CLIP" in components:
            clip = _load_single_file_clip(reader, family, configs, path=path, models_root=models_root,
                                          label=label, recipe=recipe, device=device, dtype=dtype)
        return LoadedCheckpoint(model=model, clip=clip, vae=vae, family=family, components=components, path=path,
                                tensors_read=reader.tensors_read, tensors_total=len(reader.keys))


def _clip_parts(family: str, keys: list[str]) -> list[tuple[str, str, bool]]:
    """``(config role, key prefix, OpenCLIP layout)`` of each text encoder of ``family``."""
    if family == "sd1":
        return [("text_encoder", layout.SD1_CLIP_PREFIX, False)]
    if family == "sd2":
        sgm = any(k.startswith(layout.SD2_SGM_CLIP_PREFIX) for k in keys)
        return [("text_encoder", layout.SD2_SGM_CLIP_PREFIX if sgm else layout.SD2_CLIP_PREFIX, True)]
    if family == "sdxl":
        return [("text_encoder", layout.SDXL_CLIP_L_PREFIX, False),
                ("text_encoder_2", layout.SDXL_CLIP_G_PREFIX, True)]
    return [("text_encoder_2", layout.REFINER_CLIP_G_PREFIX, True)]


def _load_single_file_clip(reader: TensorReader, family: str, configs: Mapping[str, Any], *, path: Path,
                           models_root: Path | None, label: str, recipe: Recipe, device: torch.device | str,
                           dtype: torch.dtype) -> TextEncoder:
    models: list[torch.nn.Module] = []
    tokenizers: list[Any] = []
    for role, prefix, open_clip in _clip_parts(family, reader.keys):
        raw = _read_prefixed(reader, prefix)
        if not raw:
            raise ModelFileError(f"{label}: the checkpoint has no text encoder ({prefix}*)")
        if family == "sd2":
            converted = layout.open_clip_from_ldm(raw, prefix)
        else:
            converted = _convert_clip_g(raw, prefix) if open_clip else _convert_clip_l(raw)
        del raw
        config = configs.get(role) or _clip_config(_shapes(converted), family, role)
        with_projection = open_clip and "text_projection.weight" in converted
        models.append(build_text_encoder(config, converted, with_projection=with_projection, label=label,
                                         device=device, dtype=dtype))
        tokenizer_config = shipped_config(family, "tokenizer_2_config" if role == "text_encoder_2"
                                          else "tokenizer_config")
        pad = _token_text(tokenizer_config.get("pad_token")) or ("!" if role == "text_encoder_2" else None)
        tokenizers.append(load_tokenizer(path, models_root, vocab_size=config["vocab_size"], pad_token=pad,
                                         model_max_length=config.get("max_position_embeddings", 77), label=label))
    embeddings = models_root / "embeddings" if models_root is not None else None
    return TextEncoder(tokenizers=tokenizers, models=models, family=family, recipe=recipe,
                       embeddings_dir=str(embeddings) if embeddings is not None and embeddings.is_dir() else None)
