"""Textual-inversion embeddings (``embedding:name`` in a prompt)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models.files import (
    ModelFileError,
    TensorReader,
    _label,
    record_model_file,
    resolve_model_file,
    run_settings,
)


def load_embedding_file(path: str | os.PathLike[str], *, width: int | None = None,
                        allow_pickle: bool = False) -> torch.Tensor:
    """A textual-inversion embedding ``[vectors, width]``: ``emb_params`` (safetensors), ``clip_l``/``clip_g``
    (SDXL; the one of ``width``), or A1111's ``string_to_param`` (pickle)."""
    p = Path(path)
    with TensorReader(p, allow_pickle=allow_pickle) as reader:
        sd = reader.read()
    candidates = [v for k, v in sd.items() if k in ("emb_params", "clip_l", "clip_g") or
                  k.startswith("string_to_param")] or list(sd.values())
    candidates = [c.reshape(-1, c.shape[-1]) for c in candidates if c.ndim in (1, 2, 3)]
    if width is not None:
        candidates = [c for c in candidates if c.shape[-1] == width]
    if not candidates:
        raise ModelFileError(f"{_label(p)}: no embedding vectors" + (f" of width {width}" if width else ""))
    return candidates[0].float()


def load_embedding(context: Any, name: str, *, width: int | None = None) -> torch.Tensor:
    """``embedding:name`` of a prompt: ``name`` (with or without extension) in ``<models_root>/embeddings``."""
    root, allow_pickle, *_ = run_settings(context)
    candidates = [name] if Path(name).suffix else [f"{name}{ext}" for ext in (".safetensors", ".pt", ".bin")]
    last: ModelFileError | None = None
    for candidate in candidates:
        try:
            path = resolve_model_file(root, "embeddings", candidate)
        except ModelFileError as exc:
            last = last or exc
            continue
        record_model_file(context, "embeddings", candidate, path)
        return load_embedding_file(path, width=width, allow_pickle=allow_pickle)
    assert last is not None
    raise last
