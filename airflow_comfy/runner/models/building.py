"""Building modules from a config and their tensors: on the ``meta`` device, the tensors assigned to them (no hub
access, no random initialisation, at most one copy of each tensor: none when the file's dtype is the run's);
diffusers' UNet class and transformers' CLIP text models, imported when such a module is built; the VAE is our
own :class:`~airflow_comfy.runner.models.autoencoder.Autoencoder` (no diffusers import for a VAE-only group).

Two entries: ``build_*`` take a state dict in the module's own names (diffusers folders, diffusers-layout
files); ``*_from_ldm`` take an LDM component (:class:`~airflow_comfy.runner.models.layout.LdmSource`, e.g. a
single-file checkpoint's ``model.diffusion_model.*``) and read each tensor once, as it is assigned."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.autoencoder import Autoencoder, AutoencoderShape, UnsupportedAutoencoder
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


def on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``factory()`` built on the meta device: no memory, no random initialisation."""
    with torch.device("meta"):
        return factory()


def _place(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype`` (floating point only), contiguous: at most one copy, none when it
    already fits (a file view stays a view)."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    out = tensor.to(device=device, dtype=target)
    return out if out.is_contiguous() else out.contiguous()


_PLACE_THREADS = 2
_PLACE_AHEAD = 8


def _place_all(state_dict: Mapping[str, torch.Tensor], keys: list[str], device: torch.device | str,
               dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``keys`` looked up in order (here: reads stay in this thread) and placed by two workers: a conversion
    releases the GIL, so the next lookups overlap it. At most a few looked-up tensors wait for a worker."""
    if len(keys) < 2 * _PLACE_AHEAD:
        return {k: _place(state_dict[k], device, dtype) for k in keys}
    placed: dict[str, torch.Tensor] = {}
    pending: deque[tuple[str, Future[torch.Tensor]]] = deque()
    with ThreadPoolExecutor(_PLACE_THREADS, thread_name_prefix="place") as pool:
        for key in keys:
            pending.append((key, pool.submit(_place, state_dict[key], device, dtype)))
            if len(pending) > _PLACE_AHEAD:
                done, future = pending.popleft()
                placed[done] = future.result()
        for done, future in pending:
            placed[done] = future.result()
    return placed


def assign(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str, label: str,
           device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
           fit_clip_keys: bool = False) -> torch.nn.Module:
    """Assign ``state_dict`` (a dict, or a mapping that reads on lookup) to a ``model`` built on the meta device:
    each tensor is looked up once and placed with at most one copy (bit-exact, no random init)."""
    expected = list(model.state_dict().keys())
    sd = _fit_keys(state_dict, expected) if fit_clip_keys else state_dict
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ModelFileError(f"{label}: the {what} lacks {len(missing)} of its {len(expected)} tensors "
                             f"(e.g. {', '.join(missing[:3])}): not a complete {what}, or of another architecture")
    known = set(expected)
    unexpected = [k for k in sd if k not in known]
    if unexpected:
        log.warning("%s: %d tensors of the %s were not used (e.g. %s)", label, len(unexpected), what,
                    ", ".join(unexpected[:3]))
    try:
        model.load_state_dict(_place_all(sd, expected, device, dtype), strict=True, assign=True)
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


def materialize(factory: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor], *, what: str,
                label: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                fit_clip_keys: bool = False) -> torch.nn.Module:
    """Build ``factory()`` on the meta device and assign ``state_dict`` to it (no random init, bit-exact)."""
    return assign(on_meta(factory), state_dict, what=what, label=label, device=device, dtype=dtype,
                  fit_clip_keys=fit_clip_keys)


def from_ldm(factory: Callable[[], torch.nn.Module], source: layout.LdmSource,
             plan: Callable[[list[str]], layout.Plan], *, what: str, label: str,
             device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build ``factory()`` on the meta device and read its parameters from the LDM component ``source``, each
    file tensor once, where ``plan`` (of the module's parameter names) says."""
    model = on_meta(factory)
    keys = list(model.state_dict().keys())
    return assign(model, source.planned(plan(keys)), what=what, label=label, device=device, dtype=dtype)


def _unet_class() -> type:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel


def _vae_factory(config: Mapping[str, Any], label: str) -> Callable[[], torch.nn.Module]:
    """Our own :class:`Autoencoder` of a diffusers ``AutoencoderKL`` config; a config it does not build is
    refused here, naming the file."""
    try:
        shape = AutoencoderShape.of(config)
    except UnsupportedAutoencoder as exc:
        raise ModelFileError(f"{label}: {exc}") from None
    return lambda: Autoencoder(shape)


def _clip_factory(config: Mapping[str, Any], with_projection: bool) -> Callable[[], torch.nn.Module]:
    """A transformers CLIP text model (eager attention, as ComfyUI computes it)."""
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection = _clip_classes()
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in _CLIP_DROP}, attn_implementation="eager")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return lambda: cls(cfg)


def unet_from_ldm(config: Mapping[str, Any], source: layout.LdmSource, *, label: str = "UNet",
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    cls = _unet_class()
    return from_ldm(lambda: cls.from_config(dict(config)), source, layout.unet_plan, what="UNet", label=label,
                    device=device, dtype=dtype)


def vae_from_ldm(config: Mapping[str, Any], source: layout.LdmSource, *, label: str = "VAE",
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    return from_ldm(_vae_factory(config, label), source, layout.vae_plan, what="VAE", label=label, device=device,
                    dtype=dtype)


def text_encoder_from_ldm(config: Mapping[str, Any], source: layout.LdmSource, *, open_clip: bool,
                          with_projection: bool | None = None, label: str = "text encoder",
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A CLIP text model from an LDM text-encoder component in CLIP-L layout (``open_clip=False``: transformers
    names under ``text_model.``) or OpenCLIP layout (fused q/k/v). ``with_projection`` (default: ``open_clip``)
    builds a CLIPTextModelWithProjection; without it an OpenCLIP file's ``text_projection`` is not read."""
    if open_clip:
        plan = layout.open_clip_plan
    else:
        nested = any(k.startswith("text_model.") for k in source.keys)
        def plan(keys: list[str]) -> layout.Plan:
            return layout.clip_plan(keys, nested=nested)
    projection = open_clip if with_projection is None else with_projection
    return from_ldm(_clip_factory(config, projection), source, plan, what="text encoder", label=label,
                    device=device, dtype=dtype)


def build_unet(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, label: str = "UNet",
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    cls = _unet_class()
    return materialize(lambda: cls.from_config(dict(config)), state_dict, what="UNet", label=label, device=device,
                       dtype=dtype)


def build_vae(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, label: str = "VAE",
              device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    return materialize(_vae_factory(config, label), state_dict, what="VAE", label=label, device=device,
                       dtype=dtype)


def build_text_encoder(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *,
                       with_projection: bool = False, label: str = "text encoder",
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A transformers CLIP text model (eager attention, as ComfyUI computes it)."""
    return materialize(_clip_factory(config, with_projection), state_dict, what="text encoder", label=label,
                       device=device, dtype=dtype, fit_clip_keys=True)
