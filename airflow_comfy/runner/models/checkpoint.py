"""CheckpointLoaderSimple: single-file (ComfyUI/LDM layout) checkpoints and diffusers folders into the runner's
containers (:class:`~airflow_comfy.runner.values.DiffusionModel`, ``TextEncoder``, ``VAEModel``), with an
in-process cache of the last loads.

The work is done by one module per concept: :mod:`.single_file` and :mod:`.diffusers_folder` (the two layouts),
:mod:`.families` (which family a file holds), :mod:`.config` (architecture configs), :mod:`.building` (modules
from configs and tensors), :mod:`.tokenizers` (CLIP tokenizers); :mod:`.vae_file` and :mod:`.embeddings` load
VAELoader's files and textual-inversion embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models.cache import ModelCache, clear_all
from airflow_comfy.runner.models.diffusers_folder import _load_diffusers_folder
from airflow_comfy.runner.models.files import (
    ModelFileError,
    _label,
    file_key,
    models_root_of,
    record_model_file,
    resolve_model_file,
    run_settings,
)
from airflow_comfy.runner.models.loaded import ALL_COMPONENTS, LoadedCheckpoint
from airflow_comfy.runner.models.single_file import _load_single_file
from airflow_comfy.runner.models.tokenizers import clear_tokenizer_cache
from airflow_comfy.runner.values import Recipe

__all__ = ["ALL_COMPONENTS", "LoadedCheckpoint", "cached_entries", "clear_cache", "load_checkpoint",
           "load_checkpoint_file"]

_CACHE_SIZE = 2
_CACHE: ModelCache[LoadedCheckpoint] = ModelCache(_CACHE_SIZE)


def clear_cache() -> None:
    """Forget every cached model: checkpoints, VAEs, tokenizers, ControlNets, upscalers (the next load reads the
    files again)."""
    clear_all()
    clear_tokenizer_cache()


def cached_entries() -> list[tuple]:
    return _CACHE.keys()


def _subset(entry: LoadedCheckpoint, components: frozenset[str], path: Path) -> LoadedCheckpoint:
    """Fresh containers (sharing the modules) for the requested components of a cached load of ``path`` (the
    entry may have been loaded from another path with the same content)."""
    return LoadedCheckpoint(
        model=replace(entry.model) if entry.model is not None and "MODEL" in components else None,
        clip=replace(entry.clip, tokenizers=list(entry.clip.tokenizers), models=list(entry.clip.models))
        if entry.clip is not None and "CLIP" in components else None,
        vae=replace(entry.vae) if entry.vae is not None and "VAE" in components else None,
        family=entry.family, components=components, path=path, tensors_read=0,
        tensors_total=entry.tensors_total, from_cache=True)


def _components(components: Iterable[str] | None) -> frozenset[str]:
    wanted = ALL_COMPONENTS if components is None else frozenset(c.upper() for c in components)
    unknown = wanted - ALL_COMPONENTS
    if unknown:
        raise ValueError(f"unknown checkpoint components {sorted(unknown)} (use MODEL, CLIP, VAE)")
    return wanted


def load_checkpoint_file(
    path: str | os.PathLike[str],
    components: Iterable[str] | None = None,
    *,
    name: str | None = None,
    models_root: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
) -> LoadedCheckpoint:
    """Load the requested ``components`` (subset of ``{"MODEL", "CLIP", "VAE"}``, default all) of a single-file
    checkpoint or a diffusers folder. ``name`` is what the recipe records (default: the file name);
    ``models_root`` is where tokenizers and embeddings are looked for (default: found above ``checkpoints/``).

    Loads are cached in-process (the last two, or within the service's memory budget), keyed by the file's
    content (its SHA-256: the same file under another name is served from the entry, a file changed in place
    is read again), the components, device and dtypes; a request for fewer components than a cached load is
    served from it."""
    p = Path(path)
    wanted = _components(components)
    root = Path(models_root) if models_root is not None else models_root_of(p)
    name = name or p.name
    if not p.exists():
        raise ModelFileError(f"{_label(p)}: checkpoint not found")
    base_key = (file_key(p), str(device), str(dtype), str(vae_dtype), str(root), allow_pickle) if use_cache else ()
    if use_cache:
        entry = _CACHE.find(lambda key, entry: key[:-1] == base_key and wanted <= entry.components)
        if entry is not None:
            return _renamed(_subset(entry, wanted, p), name)
    loader = _load_diffusers_folder if p.is_dir() else _load_single_file
    loaded = loader(p, wanted, name=name, models_root=root, allow_pickle=allow_pickle, device=device, dtype=dtype,
                    vae_dtype=vae_dtype)
    if use_cache:
        _CACHE.put((*base_key, wanted), loaded)
        return _renamed(_subset(loaded, wanted, p), name, fresh=loaded)
    return loaded


def _renamed(entry: LoadedCheckpoint, name: str, fresh: LoadedCheckpoint | None = None) -> LoadedCheckpoint:
    recipe = Recipe("CheckpointLoaderSimple", name)
    for attr in ("model", "clip", "vae"):
        value = getattr(entry, attr)
        if value is not None and value.recipe != recipe:
            setattr(entry, attr, replace(value, recipe=recipe))
    if fresh is not None:
        entry.tensors_read = fresh.tensors_read
        entry.from_cache = False
    return entry


def load_checkpoint(context: Any, ckpt_name: str | None = None,
                    components: Iterable[str] | None = None) -> LoadedCheckpoint:
    """CheckpointLoaderSimple for a run: ``ckpt_name`` in ``<models_root>/checkpoints``, on the run's device;
    UNet and text encoders in the run's dtype, the VAE in fp32 (bf16 when the run is bf16).

    ``load_checkpoint(path)`` (a path instead of a run context, no name) is :func:`load_checkpoint_file`."""
    if ckpt_name is None and isinstance(context, (str, os.PathLike)):
        return load_checkpoint_file(context, components)
    if ckpt_name is None:
        raise TypeError("load_checkpoint(context, ckpt_name, components) needs a checkpoint name")
    root, allow_pickle, device, dtype, vae_dtype = run_settings(context)
    path = resolve_model_file(root, "checkpoints", ckpt_name, allow_dir=True)
    record_model_file(context, "checkpoints", ckpt_name, path)
    return load_checkpoint_file(path, components, name=ckpt_name, models_root=root, allow_pickle=allow_pickle,
                                device=device, dtype=dtype, vae_dtype=vae_dtype)
