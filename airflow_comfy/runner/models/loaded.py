"""What a checkpoint load returns (:class:`LoadedCheckpoint`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from airflow_comfy.runner.values import DiffusionModel, TextEncoder, VAEModel

ALL_COMPONENTS = frozenset({"MODEL", "CLIP", "VAE"})


@dataclass
class LoadedCheckpoint:
    """What CheckpointLoaderSimple returns; components that were not requested are ``None``."""

    model: DiffusionModel | None
    clip: TextEncoder | None
    vae: VAEModel | None
    family: str
    components: frozenset[str]
    path: Path
    tensors_read: int = 0
    """Tensors read from the file(s) for this load (0 when served from the cache)."""
    tensors_total: int = 0
    from_cache: bool = False

    def outputs(self) -> tuple[DiffusionModel | None, TextEncoder | None, VAEModel | None]:
        return self.model, self.clip, self.vae
