"""A full-size SD 1.5-shaped checkpoint with random fp16 weights, for the load benchmark (``benchmarks/runner.py``).

The key names and shapes are those of a pruned SD 1.5 single file (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``, ~2.1 GB in fp16), plus the small extras
such files carry (the DDPM schedule buffers, ``model_ema.*`` counters, CLIP's ``position_ids``). They are derived
from the shipped SD 1.5 configs: the modules are built on the meta device (no memory, no initialisation) and
their names mapped to the LDM layout with :mod:`airflow_comfy.runner.models.layout`.

Writing is fast: one pool of normal noise is drawn once, and every tensor is a slice of it scaled to
``1/sqrt(fan_in)`` (1-D weights around 1, biases around 0), cast to fp16 and written straight into the
safetensors layout (an 8-byte header length, the JSON header, the raw bytes), with no second copy of the model
in memory. The file is written once and reused (its name carries a format version).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

FORMAT = 1
FILE_NAME = f"bench-sd15-fp16-v{FORMAT}.safetensors"
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")
_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


def sd15_layout() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a pruned fp16 SD 1.5 single file: LDM name -> (shape, dtype)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from airflow_comfy.runner.models import layout
    from airflow_comfy.runner.models.config import _CLIP_DROP, shipped_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_config("sd1", "unet"))
        vae = AutoencoderKL.from_config(shipped_config("sd1", "vae"))
        clip_config = {k: v for k, v in shipped_config("sd1", "text_encoder").items() if k not in _CLIP_DROP}
        clip = CLIPTextModel(CLIPTextConfig(**clip_config))
    tensors = {**layout.unet_to_ldm(unet.state_dict()), **layout.vae_to_ldm(vae.state_dict()),
               **layout.clip_to_ldm(clip.state_dict())}
    out = {key: (tuple(t.shape), torch.float16) for key, t in tensors.items()}
    out[layout.SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"] = ((1, 77), torch.int64)
    out.update({key: ((1000,), torch.float32) for key in SCHEDULE_KEYS})
    out.update({"model_ema.decay": ((), torch.float32), "model_ema.num_updates": ((), torch.int64)})
    return out


def _values(key: str, shape: tuple[int, ...], dtype: torch.dtype, pool: torch.Tensor,
            gen: torch.Generator) -> torch.Tensor:
    n = math.prod(shape)
    if dtype == torch.int64:
        return torch.arange(n, dtype=dtype).reshape(shape) if key.endswith("position_ids") else torch.zeros(
            shape, dtype=dtype)
    if key in SCHEDULE_KEYS or key.startswith("model_ema."):
        return torch.linspace(0.0001, 0.9999, n, dtype=dtype).reshape(shape)
    start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
    noise = pool[start:start + n]
    if len(shape) == 1:
        base = 1.0 if key.endswith("weight") else 0.0
        return (noise * 0.02 + base).to(dtype)
    fan_in = math.prod(shape[1:])
    return (noise * (1.0 / math.sqrt(fan_in))).to(dtype).reshape(shape)


def write_sd15_file(path: Path, *, seed: int = 0) -> Path:
    """Write the random SD 1.5-shaped file to ``path`` (atomically); returns it."""
    tensors = sd15_layout()
    gen = torch.Generator().manual_seed(seed)
    largest = max(math.prod(shape) for shape, _ in tensors.values())
    pool = torch.randn(largest + (1 << 20), generator=gen)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    order = sorted(tensors, key=lambda k: (-tensors[k][1].itemsize, k))  # widest dtypes first: aligned
    for key in order:
        shape, dtype = tensors[key]
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for key in order:
            shape, dtype = tensors[key]
            out.write(_values(key, shape, dtype, pool, gen).contiguous().reshape(-1).view(torch.uint8).numpy())
    os.replace(tmp, path)
    return path


def sd15_models(cache: Path) -> Path:
    """A models root under ``cache`` holding the file in ``checkpoints/`` (written first when missing; the CLIP
    tokenizer is the package's own); returns the models root."""
    path = cache / "checkpoints" / FILE_NAME
    if not path.is_file():
        write_sd15_file(path)
    return cache
