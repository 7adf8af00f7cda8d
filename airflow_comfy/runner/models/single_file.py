"""Single-file (ComfyUI/LDM layout) checkpoints.

Files are read with ``safetensors.safe_open`` (a memory map), and only the tensors of the requested components
(``components`` ⊆ ``{"MODEL", "CLIP", "VAE"}``): a group that only decodes reads only ``first_stage_model.*``.
The modules are built on the meta device from the configs of :mod:`.config` (see there where they come from)
and each parameter is read from its LDM tensor where :mod:`.layout`'s plans say, once, straight into the run's
dtype (:mod:`.building`): no converted copy of the state dict is made. OpenCLIP encoders (SD 2.x's ViT-H,
SDXL's bigG) keep all their layers and their projection, as ComfyUI does.
Which family and variant a file holds is :mod:`.families`' business (refusals come before any tensor is read).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.building import text_encoder_from_ldm, unet_from_ldm, vae_from_ldm
from airflow_comfy.runner.models.config import (
    LATENT_SCALE,
    _clip_config,
    _unet_config,
    _vae_config,
    embedded_config,
    shipped_config,
)
from airflow_comfy.runner.models.families import V_PROBE, detect_family, detect_prediction
from airflow_comfy.runner.models.files import ModelFileError, TensorReader, _label
from airflow_comfy.runner.models.loaded import LoadedCheckpoint
from airflow_comfy.runner.models.tokenizers import _token_text, load_tokenizer, text_encoder_name
from airflow_comfy.runner.values import DiffusionModel, Recipe, TextEncoder, VAEModel


def _strip(prefix: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _load_single_file(path: Path, components: frozenset[str], *, name: str, models_root: Path | None,
                      allow_pickle: bool, device: torch.device | str, dtype: torch.dtype,
                      vae_dtype: torch.dtype) -> LoadedCheckpoint:
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
            source = layout.LdmSource.prefixed(reader, layout.UNET_PREFIX)
            prediction = detect_prediction(family, source.planned({V_PROBE: layout.Source(V_PROBE)}),
                                           in_channels=int(config["in_channels"]), v_pred_key="v_pred" in reader,
                                           embedded=embedded.get("prediction"))
            unet = unet_from_ldm(config, source, label=label, device=device, dtype=dtype)
            model = DiffusionModel(unet=unet, family=family, latent_scale=LATENT_SCALE[family], recipe=recipe,
                                   prediction=prediction)

        if "VAE" in components:
            vae_keys = [k for k in reader.keys if k.startswith(layout.VAE_PREFIX)]
            if not vae_keys:
                raise ModelFileError(f"{label}: the checkpoint has no VAE (first_stage_model.*)")
            config = configs.get("vae") or _vae_config(
                {k[len(layout.VAE_PREFIX):]: reader.shape(k) for k in vae_keys}, family)
            module = vae_from_ldm(config, layout.LdmSource.prefixed(reader, layout.VAE_PREFIX), label=label,
                                  device=device, dtype=vae_dtype)
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
        source = layout.LdmSource.prefixed(reader, prefix)
        if not source.keys:
            raise ModelFileError(f"{label}: the checkpoint has no text encoder ({prefix}*)")
        config = configs.get(role) or _clip_config(layout.clip_shapes_from_ldm(
            {k: reader.shape(prefix + k) for k in source.keys}, open_clip=open_clip), family, role)
        with_projection = open_clip and "text_projection" in source.keys
        models.append(text_encoder_from_ldm(config, source, open_clip=open_clip, with_projection=with_projection,
                                            label=label, device=device, dtype=dtype))
        tokenizer_config = shipped_config(family, "tokenizer_2_config" if role == "text_encoder_2"
                                          else "tokenizer_config")
        pad = _token_text(tokenizer_config.get("pad_token")) or ("!" if role == "text_encoder_2" else None)
        tokenizers.append(load_tokenizer(path, models_root, vocab_size=config["vocab_size"], pad_token=pad,
                                         model_max_length=config.get("max_position_embeddings", 77), label=label,
                                         encoder=text_encoder_name(family, role)))
    embeddings = models_root / "embeddings" if models_root is not None else None
    return TextEncoder(tokenizers=tokenizers, models=models, family=family, recipe=recipe,
                       embeddings_dir=str(embeddings) if embeddings is not None and embeddings.is_dir() else None)
