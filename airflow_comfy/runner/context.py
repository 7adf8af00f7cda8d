"""What a node implementation can use besides its inputs: folders, device, logging, and where saved images go."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.workflow.inputs import InputRoots

log = logging.getLogger("airflow_comfy.runner")


class BadInput(ValueError):
    """The group's input is wrong (missing model file, unreadable image, bad value): retrying cannot help.
    The runner exits with code 2 and the task fails without retry. The message names node, class and input."""


class NodeOutOfMemory(RuntimeError):
    """A node ran out of memory, and again when it was retried in low-memory mode: an infrastructure failure
    (exit code 1, which Airflow retries, perhaps on a larger machine). The message names node and class."""


@dataclass
class SavedImage:
    node: str
    filename: str
    subfolder: str
    uri: str
    width: int
    height: int
    sha256: str


@dataclass
class RunContext:
    """Shared by every node of one group run."""

    models_root: Path
    input_dir: Path
    device: torch.device
    dtype: torch.dtype
    input_store: str = ""
    """``s3://bucket/prefix`` of the input store (``--input-store``): image params may name objects under it."""
    input_root: Path | None = None
    """The input folder as ``file://`` URIs name it (``--input-root``; default ``input_dir``): a pod mounts the
    folder elsewhere than the worker that validated the URI."""
    allow_pickle: bool = False
    prompt: dict | None = None
    """The full API prompt (params applied) for PNG metadata."""
    extra_pnginfo: dict | None = None
    save_image: Callable[[str, str, str, bytes, int, int], SavedImage] | None = None
    """``save_image(node, subfolder, filename, png_bytes, width, height)`` (set by the executor)."""
    existing_outputs: Callable[[], list[str]] | None = None
    """``existing_outputs()``: paths (``/``-separated, relative to the run's outputs) already saved, for
    ComfyUI's file-name counter."""
    saved: list[SavedImage] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    """Recipe node id -> the outputs (MODEL / CLIP / VAE ...) this group uses: a loader loads only those."""
    model_files: dict[str, str] = field(default_factory=dict)
    """file path -> sha256 of every model file loaded (the run snapshot)."""
    input_files: dict[str, str] = field(default_factory=dict)
    """input image (as the workflow or param names it) -> sha256 of the bytes read (the run snapshot)."""
    cache: dict[Any, Any] = field(default_factory=dict)
    memory_budget: int | None = None
    """Bytes one allocation of the VAE or of an attention may take (``--memory-budget-mb``; see
    :mod:`airflow_comfy.runner.memory`); ``None``: no budget, nothing is checked."""
    current_node: str | None = None
    """``node <id> (<class>)`` while a node runs: what a failure message names."""

    @property
    def input_roots(self) -> InputRoots:
        """Where input images may be (:mod:`airflow_comfy.workflow.inputs`)."""
        return InputRoots(folder=os.path.abspath(self.input_root or self.input_dir), store=self.input_store)


@dataclass
class NodeContext:
    run: RunContext
    node_id: str
    class_type: str
    low_memory: bool = False
    """The executor's retry after running out of memory: tiled VAE, sliced attention."""
    low_memory_report: dict[str, Any] = field(default_factory=dict)
    """What low-memory mode did (tile size, tiles, attention slice), for the manifest."""

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def dtype(self) -> torch.dtype:
        return self.run.dtype

    def bad_input(self, message: str, input_name: str | None = None) -> BadInput:
        where = f"node {self.node_id} ({self.class_type})"
        if input_name:
            where += f": input '{input_name}'"
        return BadInput(f"{where}: {message}")

    def progress(self, message: str) -> None:
        log.info("node %s (%s): %s", self.node_id, self.class_type, message)
