"""Textual-inversion embeddings (``embedding:name`` in a prompt): found, read and recorded by their SHA-256.

``name`` (``name`` or ``name.safetensors``; ``.pt``/``.bin`` are tried after ``.safetensors``, and read only
when the run allows pickle files) is looked for in the embeddings folder and every folder below it, the
folder itself first, as ComfyUI does; names never lead outside the models root. Which tensor holds the vectors:
the encoder's own (``clip_l`` / ``clip_g`` of SDXL files), bundled-LoRA embeddings (``bundle_emb.*``), then
``emb_params`` (safetensors) or A1111's ``string_to_param`` (pickle), else the file's tensors, the first that
has the text encoder's width.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models.files import (
    MODEL_EXTENSIONS,
    ModelFileError,
    TensorReader,
    _inside,
    _label,
    record_model_file,
)

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
"""The order ComfyUI tries extensions in."""
_VECTOR_KEYS = ("emb_params", "clip_l", "clip_g")


class EmbeddingNotFoundError(ModelFileError):
    """No file of that name in the embeddings folder (a prompt drops the embedding with a warning)."""


def _folders(root: Path) -> list[Path]:
    """``root`` and every folder below it, root first, then in sorted order."""
    found = []
    for folder, subfolders, _files in os.walk(root, followlinks=True):
        subfolders.sort()
        found.append(Path(folder))
    return found or [root]


def find_embedding_file(embeddings_dir: str | os.PathLike[str], name: str) -> Path | None:
    """The file ``name`` stands for in ``embeddings_dir`` or below it, or None."""
    root = Path(os.path.normpath(embeddings_dir))
    allowed = (root.resolve(), root.resolve().parent)  # the embeddings folder, or the models root above it
    for folder in _folders(root):
        path = Path(os.path.normpath(folder / name))
        if not _inside(path, folder):
            continue  # "../" and absolute names never leave the folder
        for candidate in (path, *(Path(f"{path}{ext}") for ext in EMBEDDING_EXTENSIONS)):
            if (candidate.is_file() and candidate.name.lower().endswith(MODEL_EXTENSIONS)
                    and any(_inside(candidate.resolve(), base) for base in allowed)):
                return candidate
    return None


def embedding_vectors(tensors: Mapping[str, torch.Tensor], *, key: str | None = None, width: int | None = None,
                      label: str = "embedding") -> torch.Tensor:
    """The ``[vectors, width]`` float32 vectors for one text encoder (``key``: ``clip_l`` / ``clip_g``)."""
    if key is not None and key in tensors:
        candidates = [tensors[key]]
    else:
        named = [v for k, v in tensors.items() if k in _VECTOR_KEYS or k.startswith("string_to_param")]
        candidates = _bundled(tensors, key) or named or list(tensors.values())
    candidates = [c.reshape(-1, c.shape[-1]) for c in candidates if c.ndim in (1, 2, 3)]
    if not candidates:
        raise ModelFileError(f"{label}: holds no embedding vectors")
    fitting = [c for c in candidates if width is None or c.shape[-1] == width]
    if not fitting:
        raise ModelFileError(f"{label}: vectors of size {candidates[0].shape[-1]} do not fit this text encoder "
                             f"({width})")
    return fitting[0].float()


def _bundled(tensors: Mapping[str, torch.Tensor], key: str | None) -> list[torch.Tensor]:
    """Embeddings bundled in a LoRA file (``bundle_emb.<name>.string_to_param.*`` or ``.clip_l``/``.clip_g``)."""
    for suffix in (".string_to_param.*", *([f".{key}"] if key else [])):
        bundled = [t for k, t in tensors.items() if k.startswith("bundle_emb.") and k.endswith(suffix)]
        if bundled:
            return [torch.cat(bundled, dim=0)]
    return []


def load_embedding_file(path: str | os.PathLike[str], *, key: str | None = None, width: int | None = None,
                        allow_pickle: bool = False) -> torch.Tensor:
    """A textual-inversion embedding file's ``[vectors, width]`` (see the module docstring for which tensor)."""
    p = Path(path)
    with TensorReader(p, allow_pickle=allow_pickle) as reader:
        tensors = reader.read()
    return embedding_vectors(tensors, key=key, width=width, label=_label(p))


def load_embedding(context: Any, name: str, *, key: str | None = None, width: int | None = None,
                   embeddings_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """``embedding:name`` of a prompt, for a run: found in ``embeddings_dir`` (default
    ``<models_root>/embeddings``) and recorded in the run's snapshot as ``embeddings/<relative path>`` with its
    SHA-256. ``context`` may be None (no pickle files, nothing recorded).

    Raises :class:`EmbeddingNotFoundError` when there is no such file, ``ModelFileError`` when it is unusable."""
    folder = Path(os.path.normpath(embeddings_dir if embeddings_dir is not None
                                   else Path(context.models_root) / "embeddings"))
    path = find_embedding_file(folder, name)
    if path is None:
        raise EmbeddingNotFoundError(f"embeddings: embedding {name!r} not found in {folder}")
    vectors = load_embedding_file(path, key=key, width=width,
                                  allow_pickle=bool(getattr(context, "allow_pickle", False)))
    record_model_file(context, "embeddings", path.relative_to(folder).as_posix(), path)
    return vectors
