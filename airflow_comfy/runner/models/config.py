"""Model configs: the shipped configs of each family (``configs/sd15``, ``configs/sd2``, ``configs/sdxl``), the
config our writer embeds in a file, and UNet/VAE/CLIP configs derived from a checkpoint's tensor shapes.

Where a single file's configs come from, in order:

1. The file's own config: a safetensors ``__metadata__`` entry ``"airflow_comfy"`` holding JSON
   ``{"format": 1, "family": ..., "configs": {"unet": {...}, "vae": {...}, "text_encoder": {...},
   "text_encoder_2": {...}}}``. Our writer (:mod:`.demo`) stores it; it is authoritative when present.
2. Otherwise the tensor shapes (block channels, layers per block, transformer depths, cross-attention width,
   linear/conv projections, SDXL's size embedding, CLIP widths/layers/positions/vocabulary) over the shipped
   config of the detected family, which supplies what shapes cannot tell (attention heads, activation, token
   ids). Models of another size than the shipped one get 64-wide attention heads (8-wide below 64 channels;
   SD 1.x always 8 heads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from airflow_comfy.runner.models import layout

LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}
"""The VAE latent scaling of each family (SD 2.x uses SD 1.x's VAE and latent format)."""
META_KEY = "airflow_comfy"
META_FORMAT = 1
_CONFIG_DIR = Path(__file__).with_name("configs")
_FAMILY_DIR = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}


@cache
def _shipped(family: str, name: str) -> dict:
    folder = _FAMILY_DIR.get(family)
    if folder is None:
        return {}
    path = _CONFIG_DIR / folder / f"{name}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_config(family: str, name: str) -> dict:
    """A copy of a shipped config (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer_config``
    ...) of ``sd1``, ``sd2`` or ``sdxl``; ``{}`` when there is none."""
    return json.loads(json.dumps(_shipped(family, name)))


def embedded_config(metadata: Mapping[str, str]) -> dict | None:
    """The config our writer embeds in ``__metadata__`` (see the module docstring), or None."""
    raw = metadata.get(META_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != META_FORMAT:
        return None
    return data


def _public(config: Mapping[str, Any]) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _unet_config(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict:
    derived = layout.unet_config_from_ldm(shapes, family=family)
    config = _public(shipped_config(family, "unet"))
    if config.get("block_out_channels") == derived["block_out_channels"]:
        derived.pop("attention_head_dim")
        if "addition_time_embed_dim" in config:
            derived.pop("addition_time_embed_dim", None)
    config.update(derived)
    config.setdefault("sample_size", 128 if family.startswith("sdxl") else 64)
    return config


def _vae_config(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict:
    config = _public(shipped_config(family, "vae"))
    config.update(layout.vae_config_from_ldm(shapes))
    config["scaling_factor"] = LATENT_SCALE.get(family, 0.18215)
    config.setdefault("sample_size", 1024 if family.startswith("sdxl") else 512)
    return config


_CLIP_DROP = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


def _clip_config(shapes: Mapping[str, tuple[int, ...]], family: str, role: str) -> dict:
    """OpenAI's CLIP-L (SD 1.x, SDXL's first encoder) uses quick_gelu; the OpenCLIP encoders (SD 2.x's ViT-H,
    SDXL's bigG) use exact GELU."""
    open_clip = role == "text_encoder_2" or family == "sd2"
    derived = layout.clip_config_from_hf(shapes, hidden_act="gelu" if open_clip else "quick_gelu")
    base = {k: v for k, v in shipped_config(family, role).items() if k not in _CLIP_DROP}
    if base and all(base.get(k) == derived[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")):
        derived.pop("num_attention_heads")
        base.update(derived)
        return base
    vocab = derived["vocab_size"]
    derived.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return derived
