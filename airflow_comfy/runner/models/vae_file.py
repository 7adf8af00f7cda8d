"""VAELoader: stand-alone VAE files, LDM (``encoder.down.*``) or diffusers (``encoder.down_blocks.*``) keys."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.building import build_vae, vae_from_ldm
from airflow_comfy.runner.models.cache import ModelCache
from airflow_comfy.runner.models.config import LATENT_SCALE, _vae_config, embedded_config
from airflow_comfy.runner.models.diffusers_folder import _rename_old_vae_attention
from airflow_comfy.runner.models.files import (
    ModelFileError,
    _label,
    file_key,
    read_by_layout,
    record_model_file,
    resolve_model_file,
    run_settings,
)
from airflow_comfy.runner.models.single_file import _shapes
from airflow_comfy.runner.values import Recipe, VAEModel

_CACHE_SIZE = 2


def vae_layout(keys: Iterable[str]) -> tuple[str, str]:
    """``("ldm" | "diffusers", prefix)`` of a stand-alone VAE file's keys."""
    keys = list(keys)
    for prefix in (layout.VAE_PREFIX, "vae.", ""):
        inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if any(k.startswith("encoder.down_blocks.") for k in inner):
            return "diffusers", prefix
        if any(k.startswith("encoder.down.") for k in inner):
            return "ldm", prefix
    raise ModelFileError("not a VAE (no encoder.down.* or encoder.down_blocks.* keys)")


_VAE_CACHE: ModelCache[VAEModel] = ModelCache(_CACHE_SIZE)


def load_vae_file(path: str | os.PathLike[str], *, name: str | None = None, family: str | None = None,
                  allow_pickle: bool = False, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, use_cache: bool = True) -> VAEModel:
    """A stand-alone VAE file (VAELoader): LDM keys (``encoder.down.*``, optionally ``first_stage_model.``) or
    diffusers keys (``encoder.down_blocks.*``). ``latent_scale`` comes from the embedded config, else ``family``
    (default sd1: 0.18215) — informational only: the sampler applies the MODEL's scale, as ComfyUI does."""
    p = Path(path)
    label = _label(p)
    name = name or p.name
    key = (file_key(p), family, str(device), str(dtype), allow_pickle)
    cached = _VAE_CACHE.get(key) if use_cache else None
    if cached is not None:
        return replace(cached, recipe=Recipe("VAELoader", name))
    kind, raw, metadata = read_by_layout(p, label, vae_layout, allow_pickle=allow_pickle,
                                         parts=("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
    embedded = embedded_config(metadata) or {}
    fam = family or embedded.get("family") or "sd1"
    if kind == "ldm":
        config = (embedded.get("configs") or {}).get("vae") or _vae_config(_shapes(raw), fam)
        module = vae_from_ldm(config, layout.LdmSource.of(raw), label=label, device=device, dtype=dtype)
    else:
        weights = _rename_old_vae_attention(raw)
        config = (embedded.get("configs") or {}).get("vae") or _vae_config(_shapes(layout.vae_to_ldm(
            {k: v for k, v in weights.items()}, prefix="")), fam)
        module = build_vae(config, weights, label=label, device=device, dtype=dtype)
    vae = VAEModel(vae=module, latent_scale=float(config.get("scaling_factor", LATENT_SCALE.get(fam, 0.18215))),
                   recipe=Recipe("VAELoader", name))
    if use_cache:
        _VAE_CACHE.put(key, vae)
    return replace(vae)


def load_vae(context: Any, vae_name: str | None = None) -> VAEModel:
    """VAELoader for a run: ``vae_name`` in ``<models_root>/vae``. ``load_vae(path)`` is :func:`load_vae_file`."""
    if vae_name is None and isinstance(context, (str, os.PathLike)):
        return load_vae_file(context)
    if vae_name is None:
        raise TypeError("load_vae(context, vae_name) needs a VAE file name")
    root, allow_pickle, device, _, vae_dtype = run_settings(context)
    path = resolve_model_file(root, "vae", vae_name)
    record_model_file(context, "vae", vae_name, path)
    return load_vae_file(path, name=vae_name, allow_pickle=allow_pickle, device=device, dtype=vae_dtype)
