"""Small API-format workflows built in code, for tests that need a precise shape."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

try:
    import comfyui_workflow_templates
except ImportError as exc:  # a dev dependency: the tests that need it must fail, not skip
    raise ImportError(
        "the tests need comfyui-workflow-templates (the `dev` extra: pip install -e '.[runner,dev]')"
    ) from exc

TEMPLATES = Path(comfyui_workflow_templates.__file__).parent / "templates"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
DATA = REPO / "tests" / "data"
OBJECT_INFO = DATA / "object_info-comfyui-0.3.64.json"
"""ComfyUI 0.3.64's ``/object_info`` for its 495 built-in nodes (provenance in tests/data/README.md)."""


def data_file(path: Path) -> Path:
    """``path``, a file the tests require: when it is missing the calling test fails, it is never skipped."""
    if not path.is_file():
        pytest.fail(f"required test data is missing: {path} (see tests/data/README.md)", pytrace=False)
    return path


def object_info() -> dict:
    """A fresh copy of ComfyUI 0.3.64's ``/object_info`` dump (:data:`OBJECT_INFO`)."""
    return json.loads(data_file(OBJECT_INFO).read_text(encoding="utf-8"))

TXT2IMG: dict = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 7, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def txt2img(**changes) -> dict:
    """TXT2IMG with ``{"<node>.<input>": value}`` changes (value ``None`` deletes the input)."""
    doc = copy.deepcopy(TXT2IMG)
    for key, value in changes.items():
        node_id, _, input_name = key.partition(".")
        if value is None:
            doc[node_id]["inputs"].pop(input_name, None)
        else:
            doc[node_id]["inputs"][input_name] = value
    return doc


def write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return path
