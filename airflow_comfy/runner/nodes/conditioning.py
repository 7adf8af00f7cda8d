"""Conditioning nodes: text encoding, combining, areas, and attaching ControlNets."""

from __future__ import annotations

from dataclasses import replace

import torch

from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.registry import implements
from airflow_comfy.runner.values import Conditioning, ControlNet, ControlRef, TextEncoder, VAEModel


@implements("CLIPTextEncode")
def clip_text_encode(ctx: NodeContext, text: str, clip: TextEncoder) -> tuple:
    from airflow_comfy.runner.text import encode_prompt

    with torch.inference_mode():
        entries, info = encode_prompt(clip, text, context=ctx.run)
    for warning in info.get("warnings", []):
        ctx.progress(f"warning: {warning}")
    return (entries,)


@implements("ConditioningCombine")
def conditioning_combine(ctx: NodeContext, conditioning_1: Conditioning, conditioning_2: Conditioning) -> tuple:
    return (list(conditioning_1) + list(conditioning_2),)


@implements("ConditioningSetArea")
def conditioning_set_area(ctx: NodeContext, conditioning: Conditioning, width: int, height: int, x: int, y: int,
                          strength: float) -> tuple:
    # ComfyUI stores the area in latent units: (height // 8, width // 8, y // 8, x // 8).
    area = (height // 8, width // 8, y // 8, x // 8)
    return ([replace(entry, area=area, strength=strength, set_area_to_bounds=False) for entry in conditioning],)


def _attach(entries: Conditioning, control_net: ControlNet, image: torch.Tensor, strength: float,
            start: float, end: float, *, apply_to_uncond: bool = False) -> Conditioning:
    out = []
    for entry in entries:
        control = ControlRef(control_net=control_net, hint=image, strength=strength, start_percent=start,
                             end_percent=end, previous=entry.control)
        out.append(replace(entry, control=control, control_apply_to_uncond=apply_to_uncond))
    return out


@implements("ControlNetApply")
def control_net_apply(ctx: NodeContext, conditioning: Conditioning, control_net: ControlNet, image: torch.Tensor,
                      strength: float) -> tuple:
    if strength == 0:
        return (conditioning,)
    # The deprecated node applies the control to the negative prompt as well (control_apply_to_uncond).
    return (_attach(conditioning, control_net, image, strength, 0.0, 1.0, apply_to_uncond=True),)


@implements("ControlNetApplyAdvanced")
def control_net_apply_advanced(ctx: NodeContext, positive: Conditioning, negative: Conditioning,
                               control_net: ControlNet, image: torch.Tensor, strength: float, start_percent: float,
                               end_percent: float, vae: VAEModel | None = None) -> tuple:
    if strength == 0:
        return (positive, negative)
    return (_attach(positive, control_net, image, strength, start_percent, end_percent),
            _attach(negative, control_net, image, strength, start_percent, end_percent))
