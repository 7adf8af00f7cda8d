"""LoraLoader: merge a LoRA into copies of a model's UNet and text encoder(s): ``W += strength · (alpha/rank) · up@down``.

Key layouts understood (grouped by the module they patch):

* kohya / ComfyUI: ``lora_unet_<module>`` and ``lora_te_<module>`` (SDXL: ``lora_te1_`` CLIP-L, ``lora_te2_``
  bigG) with ``.lora_up.weight``, ``.lora_down.weight`` and ``.alpha``. ``<module>`` is a module path with
  ``.`` replaced by ``_``, in diffusers naming (SD 1.x LoRAs: ``down_blocks_0_attentions_0_...``) or in LDM naming
  (SDXL LoRAs: ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``); both are recognised.
* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``, ``text_encoder_2.``),
  the older ``.lora.down.weight`` / ``.lora.up.weight``, and ``diffusion_model.<ldm module>.*`` (ComfyUI's own
  format).

Module names are matched against the loaded modules themselves: every module path of the UNet (and its LDM
equivalent, from :mod:`.layout`) and of the text models, with ``.`` -> ``_``. Unmatched keys are logged with a
count; a file where nothing matches is an error. The base model is never changed: the returned containers hold
shallow copies of the modules that share every tensor except the patched weights.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.files import ModelFileError, TensorReader, _label, resolve_model_file
from airflow_comfy.runner.values import DiffusionModel, TextEncoder

log = logging.getLogger(__name__)

_SUFFIXES = (
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_mid.weight", "mid"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".alpha", "alpha"), (".dora_scale", "dora"),
)
_UNSUPPORTED_MARKERS = ("hada_", "lokr_", ".diff", ".diff_b", ".w_norm", ".b_norm", ".on_input")


@dataclass
class LoraPart:
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    mid: torch.Tensor | None = None
    dora: torch.Tensor | None = None


def _us(name: str) -> str:
    return name.replace(".", "_")


def _target_of(base: str) -> tuple[str, str] | None:
    """``(target, underscore module name)``; target is ``unet``, ``te1`` or ``te2``."""
    base = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", base)
    base = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", base)
    for prefix, target in (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1")):
        if base.startswith(prefix):
            return target, base[len(prefix):]
    for prefix, target in (("unet.", "unet"), ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
                           ("lora_unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
                           ("lora_te2.", "te2"), ("lora_te1.", "te1"), ("lora_te.", "te1")):
        if base.startswith(prefix):
            return target, _us(base[len(prefix):])
    return None


def parse_lora(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, LoraPart], list[str]]:
    """Group a LoRA state dict by patched module (``{base name: LoraPart}``) and list the keys not understood."""
    parts: dict[str, LoraPart] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        for suffix, field in _SUFFIXES:
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                part = parts.setdefault(base, LoraPart())
                if field == "alpha":
                    part.alpha = float(value.float().reshape(-1)[0])
                else:
                    setattr(part, field, value)
                break
        else:
            unknown.append(key)
    return parts, unknown


def _weighted_modules(root: torch.nn.Module) -> dict[str, str]:
    return {name: name for name, module in root.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor) and name}


def unet_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """underscore name (diffusers and LDM naming) -> diffusers module path, for every weighted UNet module."""
    modules = _weighted_modules(unet)
    names = {_us(m): m for m in modules}
    for dkey, lkey in layout.unet_key_map(unet.state_dict().keys()).items():
        module, _, param = dkey.rpartition(".")
        if param == "weight" and module in modules:
            names.setdefault(_us(lkey.rpartition(".")[0]), module)
    return names


def text_module_names(model: torch.nn.Module) -> dict[str, str]:
    """underscore name (with and without ``text_model.``) -> module path, for every weighted text-model module."""
    names: dict[str, str] = {}
    for module in _weighted_modules(model):
        names[_us(module)] = module
        if module.startswith("text_model."):
            names.setdefault(_us(module[len("text_model."):]), module)
        else:
            names.setdefault(_us("text_model." + module), module)
    return names


def _delta(part: LoraPart, weight: torch.Tensor) -> torch.Tensor:
    up = part.up.float()
    down = part.down.float()
    rank = down.shape[0]
    scale = (part.alpha / rank) if part.alpha is not None else 1.0
    if part.mid is not None:
        raise ValueError("LoCon CP-decomposed (lora_mid) weights are not supported")
    product = up.flatten(1) @ down.flatten(1)
    if product.numel() != weight.numel():
        raise ValueError(f"shape {tuple(product.shape)} does not fit weight {tuple(weight.shape)}")
    return product.reshape(weight.shape) * scale


def patched_copy(root: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``root`` sharing all tensors except the weights in ``deltas`` (module path -> delta), which are
    new tensors ``W + delta`` (computed in fp32, stored in W's dtype)."""
    memo = {id(t): t for t in itertools.chain(root.parameters(), root.buffers())}
    clone = copy.deepcopy(root, memo)
    for name, delta in deltas.items():
        module = clone.get_submodule(name)
        weight = module.weight
        merged = (weight.detach().float() + delta.to(weight.device)).to(weight.dtype)
        module.weight = torch.nn.Parameter(merged, requires_grad=False)
    return clone


def _plan(parts: dict[str, LoraPart], unet: torch.nn.Module | None, texts: dict[str, torch.nn.Module]
          ) -> tuple[dict[str, dict[str, LoraPart]], list[str]]:
    """Which module of which target each LoRA part patches: ``({target: {module: part}}, unmatched)``."""
    maps: dict[str, dict[str, str]] = {}
    if unet is not None:
        maps["unet"] = unet_module_names(unet)
    for role, model in texts.items():
        maps[role] = text_module_names(model)
    plan: dict[str, dict[str, LoraPart]] = {}
    unmatched: list[str] = []
    for base, part in parts.items():
        if part.up is None or part.down is None:
            unmatched.append(base)
            continue
        target = _target_of(base)
        if target is None or target[0] not in maps or target[1] not in maps[target[0]]:
            unmatched.append(base)
            continue
        plan.setdefault(target[0], {})[maps[target[0]][target[1]]] = part
    return plan, unmatched


def _text_roles(clip: TextEncoder | None) -> dict[str, int]:
    """``te1`` (CLIP-L / SD 1.x CLIP) and ``te2`` (OpenCLIP bigG, the one with a projection) -> model index."""
    roles: dict[str, int] = {}
    if clip is None:
        return roles
    for index, model in enumerate(clip.models):
        role = "te2" if hasattr(model, "text_projection") else "te1"
        roles.setdefault(role, index)
    return roles


def apply_lora_state_dict(model: DiffusionModel | None, clip: TextEncoder | None, state_dict: dict[str, torch.Tensor],
                          strength_model: float, strength_clip: float, *, name: str, label: str | None = None
                          ) -> tuple[DiffusionModel | None, TextEncoder | None]:
    """Merge a LoRA state dict; see :func:`apply_lora_file`."""
    label = label or f"loras/{name}"
    parts, unknown = parse_lora(state_dict)
    unsupported = [k for k in unknown if any(m in k for m in _UNSUPPORTED_MARKERS)]
    roles = _text_roles(clip)
    texts = {role: clip.models[i] for role, i in roles.items()} if clip is not None else {}
    plan, unmatched = _plan(parts, model.unet if model is not None else None, texts)
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    misfits: list[str] = []
    for target, entries in plan.items():
        root = model.unet if target == "unet" else texts[target]
        strength = strength_model if target == "unet" else strength_clip
        for module_name, part in entries.items():
            weight = root.get_submodule(module_name).weight
            try:
                delta = _delta(part, weight)
            except ValueError as exc:
                misfits.append(f"{module_name}: {exc}")
                continue
            if part.dora is not None:
                misfits.append(f"{module_name}: DoRA is not supported")
                continue
            if strength != 0:
                deltas.setdefault(target, {})[module_name] = delta * strength
    applied = sum(len(v) for v in plan.values()) - len(misfits)
    if applied <= 0:
        detail = ""
        if misfits:
            detail = f"; {len(misfits)} matched modules do not fit (a LoRA for another model?), e.g. {misfits[0]}"
        elif unsupported:
            detail = f"; LyCORIS LoHa/LoKr/full-diff keys are not supported (e.g. {unsupported[0]})"
        first = (unmatched + unknown)[:3]
        raise ModelFileError(f"{label}: no LoRA weight matches a module of the loaded model "
                             f"({len(unmatched) + len(unknown)} unmatched keys, e.g. {', '.join(first)}){detail}")
    if unmatched or unknown or misfits:
        log.warning("%s: %d LoRA entries did not match the model and were ignored (e.g. %s)", label,
                    len(unmatched) + len(unknown) + len(misfits), ", ".join((unmatched + unknown + misfits)[:3]))
    patch = ("lora", name, float(strength_model), float(strength_clip))
    new_model = new_clip = None
    if model is not None:
        unet = patched_copy(model.unet, deltas["unet"]) if "unet" in deltas else model.unet
        new_model = replace(model, unet=unet, recipe=replace(model.recipe, patches=model.recipe.patches + (patch,)))
    if clip is not None:
        models = list(clip.models)
        for role, index in roles.items():
            if role in deltas:
                models[index] = patched_copy(models[index], deltas[role])
        new_clip = replace(clip, models=models, tokenizers=list(clip.tokenizers),
                           recipe=replace(clip.recipe, patches=clip.recipe.patches + (patch,)))
    return new_model, new_clip


def apply_lora_file(model: DiffusionModel | None, clip: TextEncoder | None, path: str | os.PathLike[str],
                    strength_model: float, strength_clip: float, *, name: str | None = None,
                    allow_pickle: bool = False) -> tuple[DiffusionModel | None, TextEncoder | None]:
    """LoraLoader: new ``(model, clip)`` containers with the LoRA merged and ``("lora", name, strength_model,
    strength_clip)`` appended to their recipes. Both strengths 0: the inputs are returned unchanged (ComfyUI)."""
    p = Path(path)
    name = name or p.name
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    with TensorReader(p, allow_pickle=allow_pickle) as reader:
        state_dict = reader.read()
    return apply_lora_state_dict(model, clip, state_dict, strength_model, strength_clip, name=name, label=_label(p))


def apply_lora(context: Any, model: DiffusionModel | None, clip: TextEncoder | None, lora_name: str,
               strength_model: float, strength_clip: float) -> tuple[DiffusionModel | None, TextEncoder | None]:
    """LoraLoader for a run: ``lora_name`` in ``<models_root>/loras``."""
    from airflow_comfy.runner.models.files import record_model_file

    if strength_model == 0 and strength_clip == 0:
        return model, clip
    path = resolve_model_file(Path(context.models_root), "loras", lora_name)
    record_model_file(context, "loras", lora_name, path)
    return apply_lora_file(model, clip, path, strength_model, strength_clip, name=lora_name,
                           allow_pickle=bool(getattr(context, "allow_pickle", False)))
