"""Building modules from a config and a state dict: on the ``meta`` device, the tensors assigned to them (no hub
access, no random initialisation); diffusers' UNet/VAE classes, transformers' CLIP text models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from airflow_comfy.runner.models.config import _CLIP_DROP
from airflow_comfy.runner.models.files import ModelFileError

log = logging.getLogger(__name__)


def _clip_classes():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def _fit_keys(state_dict: Mapping[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Adapt ``text_model.``-prefixed CLIP keys to the model's own naming (transformers 4 vs 5)."""
    target = set(expected)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in target:
            out[key] = value
        elif key.startswith("text_model.") and key[len("text_model."):] in target:
            out[key[len("text_model."):]] = value
        elif "text_model." + key in target:
            out["text_model." + key] = value
        else:
            out[key] = value
    return out


def materialize(factory: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor], *, what: str,
                label: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                fit_clip_keys: bool = False) -> torch.nn.Module:
    """Build ``factory()`` on the meta device and assign ``state_dict`` to it (no random init, bit-exact)."""
    with torch.device("meta"):
        model = factory()
    expected = list(model.state_dict().keys())
    sd = _fit_keys(state_dict, expected) if fit_clip_keys else dict(state_dict)
    missing = [k for k in expected if sd.get(k) is None]
    if missing:
        raise ModelFileError(f"{label}: the {what} lacks {len(missing)} of its {len(expected)} tensors "
                             f"(e.g. {', '.join(missing[:3])}): not a complete {what}, or of another architecture")
    unexpected = [k for k in sd if k not in set(expected)]
    if unexpected:
        log.warning("%s: %d tensors of the %s were not used (e.g. %s)", label, len(unexpected), what,
                    ", ".join(unexpected[:3]))
    def place(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device)

    try:
        model.load_state_dict({k: place(sd[k]) for k in expected}, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{label}: the {what}'s tensors do not fit the derived architecture: {exc}") from exc
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if attr == "position_ids":
                owner.register_buffer(attr, torch.arange(buffer.shape[-1], device=device).expand((1, -1)),
                                      persistent=False)
            else:
                raise ModelFileError(f"{label}: the {what} has an uninitialised buffer {name}")
    model.eval()
    model.requires_grad_(False)
    return model


def build_unet(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, label: str = "UNet",
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return materialize(lambda: UNet2DConditionModel.from_config(dict(config)), state_dict, what="UNet",
                       label=label, device=device, dtype=dtype)


def build_vae(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, label: str = "VAE",
              device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return materialize(lambda: AutoencoderKL.from_config(dict(config)), state_dict, what="VAE", label=label,
                       device=device, dtype=dtype)


def build_text_encoder(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                       with_projection: bool = False, label: str = "text encoder",
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A transformers CLIP text model (eager attention, as ComfyUI computes it)."""
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection = _clip_classes()
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in _CLIP_DROP}, attn_implementation="eager")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return materialize(lambda: cls(cfg), state_dict, what="text encoder", label=label, device=device, dtype=dtype,
                       fit_clip_keys=True)
