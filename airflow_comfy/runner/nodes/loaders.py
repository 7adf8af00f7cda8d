"""Loaders and model patches: the *recipe* nodes a group replays. A loader loads only the components its
group uses (the spec's ``components``): a decode-only group reads just the VAE's tensors."""

from __future__ import annotations

from dataclasses import replace

from airflow_comfy.runner import models
from airflow_comfy.runner.context import NodeContext
from airflow_comfy.runner.registry import implements
from airflow_comfy.runner.values import DiffusionModel, TextEncoder

_ALL = ("MODEL", "CLIP", "VAE")


@implements("CheckpointLoaderSimple")
def checkpoint_loader_simple(ctx: NodeContext, ckpt_name: str) -> tuple:
    components = ctx.run.components.get(ctx.node_id) or list(_ALL)
    loaded = models.load_checkpoint(ctx.run, ckpt_name, components)
    ctx.progress(f"loaded {ckpt_name} ({loaded.family}; {', '.join(sorted(loaded.components))}; "
                 f"{loaded.tensors_read}/{loaded.tensors_total} tensors read)")
    return loaded.outputs()


@implements("VAELoader")
def vae_loader(ctx: NodeContext, vae_name: str) -> tuple:
    return (models.load_vae(ctx.run, vae_name),)


@implements("LoraLoader")
def lora_loader(ctx: NodeContext, model: DiffusionModel, clip: TextEncoder, lora_name: str, strength_model: float,
                strength_clip: float) -> tuple:
    return models.apply_lora(ctx.run, model, clip, lora_name, strength_model, strength_clip)


@implements("CLIPSetLastLayer")
def clip_set_last_layer(ctx: NodeContext, clip: TextEncoder, stop_at_clip_layer: int) -> tuple:
    return (replace(clip, layer=stop_at_clip_layer),)


@implements("ControlNetLoader")
def control_net_loader(ctx: NodeContext, control_net_name: str) -> tuple:
    return (models.load_control_net(ctx.run, control_net_name),)


@implements("UpscaleModelLoader")
def upscale_model_loader(ctx: NodeContext, model_name: str) -> tuple:
    return (models.load_upscale_model(ctx.run, model_name),)
