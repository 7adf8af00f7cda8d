"""Declarations of the node types airflow-comfy's own runner executes.

This module is the single source of truth for the built-in node set: :meth:`Catalog.builtin
<airflow_comfy.workflow.catalog.Catalog.builtin>` turns :data:`CORE_NODES` into the catalog that workflow
conversion and validation use, and the runner registers one implementation per ``class_type`` declared here.
A node that is not declared here is not runnable, whatever an ``object_info`` file says about it.

Each declaration mirrors what ComfyUI 0.3.64 reports for the node in ``GET /object_info``: the input names in
``input_order`` (required, then optional), their types and widget options (``default``, ``min``, ``max``,
``step``, ``round``, ``multiline``, ``dynamicPrompts``, ``control_after_generate``, ``image_upload``,
``forceInput``), the outputs with their names, ``output_node``, the hidden inputs, the category and the
display name. Those are interface facts a workflow file depends on (``widgets_values`` is positional over
them), so they must match exactly; the test suite checks every declaration against a recorded
``/object_info`` dump.

Differences from ComfyUI, on purpose:

* Inputs whose choices are the files of a model or image folder carry ``choices=None`` and the folder they are
  confined to (``folder``); the runner resolves them against its own model store.
* ``sampler_name`` / ``scheduler`` offer only what the runner implements (:data:`SUPPORTED_SAMPLERS`,
  :data:`SUPPORTED_SCHEDULERS`), in ComfyUI's order.
* No tooltips or descriptions.

Plain data only: importing this module must not pull in torch or Airflow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from airflow_comfy.workflow.catalog import InputSpec, NodeSpec, OutputSpec

MAX_RESOLUTION = 16384
"""ComfyUI's upper bound for pixel sizes and offsets."""

MAX_SEED = 2**64 - 1

UPSCALE_METHODS_IMAGE = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
UPSCALE_METHODS_LATENT = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")

SUPPORTED_SAMPLERS = (
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
"""The sampler names the runner implements: a subset of ComfyUI's list, kept in ComfyUI's order (so the first
entry, the frontend's default, is the same). ``uni_pc_bh2`` is in because three of the classic templates
(embedding_example, hiresfix_esrgan_workflow, inpaint_example) use it."""

SUPPORTED_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal")
"""The scheduler names the runner implements, in ComfyUI's order."""

FILE_FOLDERS: dict[str, str] = {
    "checkpoints": "full model checkpoints (diffusion model, text encoder and VAE in one file)",
    "vae": "stand-alone VAE weights",
    "loras": "LoRA adapters applied on top of a model and its text encoder",
    "controlnet": "ControlNet and T2I-adapter weights",
    "upscale_models": "image super-resolution models (ESRGAN and similar)",
    "input": "images a workflow reads",
    "output": "where saved images are written",
}
"""The root folders file-name inputs are confined to, and what each holds."""


# --- declaration helpers ------------------------------------------------------------


def _options(**values: Any) -> dict[str, Any]:
    """The options that were given (``None`` means "not set": ComfyUI leaves the key out)."""
    return {key: value for key, value in values.items() if value is not None}


def _flag(enabled: bool) -> bool | None:
    """A boolean option ComfyUI only states when it is on."""
    return True if enabled else None


def socket(name: str, type_: str, *, optional: bool = False) -> InputSpec:
    """A link-only input (MODEL, CLIP, IMAGE, ...)."""
    return InputSpec(name, type_, required=not optional)


def int_input(
    name: str,
    *,
    default: int,
    min: int | None = None,
    max: int | None = None,
    step: int | None = None,
    control_after_generate: bool = False,
    optional: bool = False,
) -> InputSpec:
    options = _options(default=default, min=min, max=max, step=step,
                       control_after_generate=_flag(control_after_generate))
    return InputSpec(name, "INT", required=not optional, options=options)


def float_input(
    name: str,
    *,
    default: float,
    min: float | None = None,
    max: float | None = None,
    step: float | None = None,
    round: float | None = None,
    optional: bool = False,
) -> InputSpec:
    options = _options(default=default, min=min, max=max, step=step, round=round)
    return InputSpec(name, "FLOAT", required=not optional, options=options)


def string_input(
    name: str,
    *,
    default: str | None = None,
    multiline: bool = False,
    dynamic_prompts: bool = False,
    folder: str | None = None,
    optional: bool = False,
) -> InputSpec:
    options = _options(default=default, multiline=_flag(multiline),
                       dynamicPrompts=_flag(dynamic_prompts))
    return InputSpec(name, "STRING", required=not optional, options=options, folder=folder)


def combo(name: str, choices: Iterable[str], *, optional: bool = False) -> InputSpec:
    """A drop-down with a fixed list of values."""
    return InputSpec(name, "COMBO", required=not optional, choices=tuple(choices))


def file_combo(name: str, folder: str, *, image_upload: bool = False) -> InputSpec:
    """A drop-down over the files of ``folder`` (one of :data:`FILE_FOLDERS`)."""
    if folder not in FILE_FOLDERS:
        raise ValueError(f"unknown file folder {folder!r}")
    options = _options(image_upload=_flag(image_upload))
    return InputSpec(name, "COMBO", options=options, choices=None, folder=folder)


def node(
    class_type: str,
    *,
    category: str,
    display_name: str,
    inputs: Iterable[InputSpec],
    outputs: Iterable[str | tuple[str, str]] = (),
    output_node: bool = False,
    hidden: Iterable[str] = (),
) -> NodeSpec:
    """A runnable built-in node. ``outputs`` lists types, or ``(type, name)`` where the name differs."""
    output_specs = []
    for out in outputs:
        type_, name = (out, out) if isinstance(out, str) else out
        output_specs.append(OutputSpec(name, type_))
    return NodeSpec(
        class_type=class_type,
        inputs=tuple(inputs),
        outputs=tuple(output_specs),
        output_node=output_node,
        category=category,
        display_name=display_name,
        hidden=tuple(hidden),
        runnable=True,
        source="built-in",
    )


def _upscale_inputs(subject: InputSpec, methods: tuple[str, ...], size_step: int) -> list[InputSpec]:
    return [
        subject,
        combo("upscale_method", methods),
        int_input("width", default=512, min=0, max=MAX_RESOLUTION, step=size_step),
        int_input("height", default=512, min=0, max=MAX_RESOLUTION, step=size_step),
        combo("crop", CROP_METHODS),
    ]


def _pad(name: str, default: int = 0, step: int = 8) -> InputSpec:
    return int_input(name, default=default, min=0, max=MAX_RESOLUTION, step=step)


_SEED = {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}
_STEPS = {"default": 20, "min": 1, "max": 10000}
_CFG = {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}
_STRENGTH = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}
_LORA_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.001}
_HIDDEN_PNG = ("prompt", "extra_pnginfo")


# --- the declarations ---------------------------------------------------------------

CORE_NODES: tuple[NodeSpec, ...] = (
    # loaders
    node("CheckpointLoaderSimple", category="loaders", display_name="Load Checkpoint",
         inputs=[file_combo("ckpt_name", "checkpoints")],
         outputs=["MODEL", "CLIP", "VAE"]),
    node("VAELoader", category="loaders", display_name="Load VAE",
         inputs=[file_combo("vae_name", "vae")],
         outputs=["VAE"]),
    node("LoraLoader", category="loaders", display_name="Load LoRA",
         inputs=[socket("model", "MODEL"), socket("clip", "CLIP"),
                 file_combo("lora_name", "loras"),
                 float_input("strength_model", **_LORA_STRENGTH),
                 float_input("strength_clip", **_LORA_STRENGTH)],
         outputs=["MODEL", "CLIP"]),
    node("ControlNetLoader", category="loaders", display_name="Load ControlNet Model",
         inputs=[file_combo("control_net_name", "controlnet")],
         outputs=["CONTROL_NET"]),
    node("UpscaleModelLoader", category="loaders", display_name="Load Upscale Model",
         inputs=[file_combo("model_name", "upscale_models")],
         outputs=["UPSCALE_MODEL"]),

    # conditioning
    node("CLIPSetLastLayer", category="conditioning", display_name="CLIP Set Last Layer",
         inputs=[socket("clip", "CLIP"),
                 int_input("stop_at_clip_layer", default=-1, min=-24, max=-1, step=1)],
         outputs=["CLIP"]),
    node("CLIPTextEncode", category="conditioning", display_name="CLIP Text Encode (Prompt)",
         inputs=[string_input("text", multiline=True, dynamic_prompts=True), socket("clip", "CLIP")],
         outputs=["CONDITIONING"]),
    node("ConditioningCombine", category="conditioning", display_name="Conditioning (Combine)",
         inputs=[socket("conditioning_1", "CONDITIONING"), socket("conditioning_2", "CONDITIONING")],
         outputs=["CONDITIONING"]),
    node("ConditioningSetArea", category="conditioning", display_name="Conditioning (Set Area)",
         inputs=[socket("conditioning", "CONDITIONING"),
                 int_input("width", default=64, min=64, max=MAX_RESOLUTION, step=8),
                 int_input("height", default=64, min=64, max=MAX_RESOLUTION, step=8),
                 int_input("x", default=0, min=0, max=MAX_RESOLUTION, step=8),
                 int_input("y", default=0, min=0, max=MAX_RESOLUTION, step=8),
                 float_input("strength", **_STRENGTH)],
         outputs=["CONDITIONING"]),
    # ComfyUI flags this one deprecated (display name "Apply ControlNet (OLD)"); templates still use it.
    node("ControlNetApply", category="conditioning/controlnet", display_name="Apply ControlNet (OLD)",
         inputs=[socket("conditioning", "CONDITIONING"), socket("control_net", "CONTROL_NET"),
                 socket("image", "IMAGE"), float_input("strength", **_STRENGTH)],
         outputs=["CONDITIONING"]),
    node("ControlNetApplyAdvanced", category="conditioning/controlnet", display_name="Apply ControlNet",
         inputs=[socket("positive", "CONDITIONING"), socket("negative", "CONDITIONING"),
                 socket("control_net", "CONTROL_NET"), socket("image", "IMAGE"),
                 float_input("strength", **_STRENGTH),
                 float_input("start_percent", default=0.0, **_PERCENT),
                 float_input("end_percent", default=1.0, **_PERCENT),
                 socket("vae", "VAE", optional=True)],
         outputs=[("CONDITIONING", "positive"), ("CONDITIONING", "negative")]),

    # latent
    node("EmptyLatentImage", category="latent", display_name="Empty Latent Image",
         inputs=[int_input("width", default=512, min=16, max=MAX_RESOLUTION, step=8),
                 int_input("height", default=512, min=16, max=MAX_RESOLUTION, step=8),
                 int_input("batch_size", default=1, min=1, max=4096)],
         outputs=["LATENT"]),
    node("LatentUpscale", category="latent", display_name="Upscale Latent",
         inputs=_upscale_inputs(socket("samples", "LATENT"), UPSCALE_METHODS_LATENT, size_step=8),
         outputs=["LATENT"]),
    node("LatentUpscaleBy", category="latent", display_name="Upscale Latent By",
         inputs=[socket("samples", "LATENT"), combo("upscale_method", UPSCALE_METHODS_LATENT),
                 float_input("scale_by", default=1.5, min=0.01, max=8.0, step=0.01)],
         outputs=["LATENT"]),
    node("LatentFromBatch", category="latent/batch", display_name="Latent From Batch",
         inputs=[socket("samples", "LATENT"),
                 int_input("batch_index", default=0, min=0, max=63),
                 int_input("length", default=1, min=1, max=64)],
         outputs=["LATENT"]),
    node("RepeatLatentBatch", category="latent/batch", display_name="Repeat Latent Batch",
         inputs=[socket("samples", "LATENT"), int_input("amount", default=1, min=1, max=64)],
         outputs=["LATENT"]),
    node("SetLatentNoiseMask", category="latent/inpaint", display_name="Set Latent Noise Mask",
         inputs=[socket("samples", "LATENT"), socket("mask", "MASK")],
         outputs=["LATENT"]),
    node("VAEEncode", category="latent", display_name="VAE Encode",
         inputs=[socket("pixels", "IMAGE"), socket("vae", "VAE")],
         outputs=["LATENT"]),
    node("VAEEncodeForInpaint", category="latent/inpaint", display_name="VAE Encode (for Inpainting)",
         inputs=[socket("pixels", "IMAGE"), socket("vae", "VAE"), socket("mask", "MASK"),
                 int_input("grow_mask_by", default=6, min=0, max=64, step=1)],
         outputs=["LATENT"]),
    node("VAEDecode", category="latent", display_name="VAE Decode",
         inputs=[socket("samples", "LATENT"), socket("vae", "VAE")],
         outputs=["IMAGE"]),

    # sampling
    node("KSampler", category="sampling", display_name="KSampler",
         inputs=[socket("model", "MODEL"),
                 int_input("seed", **_SEED),
                 int_input("steps", **_STEPS),
                 float_input("cfg", **_CFG),
                 combo("sampler_name", SUPPORTED_SAMPLERS),
                 combo("scheduler", SUPPORTED_SCHEDULERS),
                 socket("positive", "CONDITIONING"), socket("negative", "CONDITIONING"),
                 socket("latent_image", "LATENT"),
                 float_input("denoise", default=1.0, min=0.0, max=1.0, step=0.01)],
         outputs=["LATENT"]),
    node("KSamplerAdvanced", category="sampling", display_name="KSampler (Advanced)",
         inputs=[socket("model", "MODEL"),
                 combo("add_noise", ("enable", "disable")),
                 int_input("noise_seed", **_SEED),
                 int_input("steps", **_STEPS),
                 float_input("cfg", **_CFG),
                 combo("sampler_name", SUPPORTED_SAMPLERS),
                 combo("scheduler", SUPPORTED_SCHEDULERS),
                 socket("positive", "CONDITIONING"), socket("negative", "CONDITIONING"),
                 socket("latent_image", "LATENT"),
                 int_input("start_at_step", default=0, min=0, max=10000),
                 int_input("end_at_step", default=10000, min=0, max=10000),
                 combo("return_with_leftover_noise", ("disable", "enable"))],
         outputs=["LATENT"]),

    # image
    node("LoadImage", category="image", display_name="Load Image",
         inputs=[file_combo("image", "input", image_upload=True)],
         outputs=["IMAGE", "MASK"]),
    node("LoadImageMask", category="mask", display_name="Load Image (as Mask)",
         inputs=[file_combo("image", "input", image_upload=True),
                 combo("channel", ("alpha", "red", "green", "blue"))],
         outputs=["MASK"]),
    node("ImageScale", category="image/upscaling", display_name="Upscale Image",
         inputs=_upscale_inputs(socket("image", "IMAGE"), UPSCALE_METHODS_IMAGE, size_step=1),
         outputs=["IMAGE"]),
    node("ImageScaleBy", category="image/upscaling", display_name="Upscale Image By",
         inputs=[socket("image", "IMAGE"), combo("upscale_method", UPSCALE_METHODS_IMAGE),
                 float_input("scale_by", default=1.0, min=0.01, max=8.0, step=0.01)],
         outputs=["IMAGE"]),
    # ComfyUI reports no display name for this node and Canny; the frontend then shows the class type.
    node("ImageScaleToTotalPixels", category="image/upscaling", display_name="ImageScaleToTotalPixels",
         inputs=[socket("image", "IMAGE"), combo("upscale_method", UPSCALE_METHODS_IMAGE),
                 float_input("megapixels", default=1.0, min=0.01, max=16.0, step=0.01)],
         outputs=["IMAGE"]),
    node("ImageUpscaleWithModel", category="image/upscaling", display_name="Upscale Image (using Model)",
         inputs=[socket("upscale_model", "UPSCALE_MODEL"), socket("image", "IMAGE")],
         outputs=["IMAGE"]),
    node("ImageInvert", category="image", display_name="Invert Image",
         inputs=[socket("image", "IMAGE")],
         outputs=["IMAGE"]),
    node("ImageBatch", category="image", display_name="Batch Images",
         inputs=[socket("image1", "IMAGE"), socket("image2", "IMAGE")],
         outputs=["IMAGE"]),
    node("ImagePadForOutpaint", category="image", display_name="Pad Image for Outpainting",
         inputs=[socket("image", "IMAGE"), _pad("left"), _pad("top"), _pad("right"), _pad("bottom"),
                 _pad("feathering", default=40, step=1)],
         outputs=["IMAGE", "MASK"]),
    node("Canny", category="image/preprocessors", display_name="Canny",
         inputs=[socket("image", "IMAGE"),
                 float_input("low_threshold", default=0.4, min=0.01, max=0.99, step=0.01),
                 float_input("high_threshold", default=0.8, min=0.01, max=0.99, step=0.01)],
         outputs=["IMAGE"]),

    # output
    node("SaveImage", category="image", display_name="Save Image",
         inputs=[socket("images", "IMAGE"),
                 string_input("filename_prefix", default="ComfyUI", folder="output")],
         output_node=True, hidden=_HIDDEN_PNG),
    node("PreviewImage", category="image", display_name="Preview Image",
         inputs=[socket("images", "IMAGE")],
         output_node=True, hidden=_HIDDEN_PNG),
)
"""The 34 node types the runner executes."""

__all__ = [
    "CORE_NODES",
    "FILE_FOLDERS",
    "MAX_RESOLUTION",
    "SUPPORTED_SAMPLERS",
    "SUPPORTED_SCHEDULERS",
    "combo",
    "file_combo",
    "float_input",
    "int_input",
    "node",
    "socket",
    "string_input",
]
