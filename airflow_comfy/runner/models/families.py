"""Which Stable Diffusion family a single file holds, which variant, and whether we run it.

Families (the facts ComfyUI's model detection uses, ``comfy/model_detection.py`` / ``supported_models.py``):

* ``sd1``: SD 1.x. OpenAI CLIP ViT-L at ``cond_stage_model.transformer.``; UNet cross-attention 768 wide,
  convolutional transformer projections, 8 heads per block.
* ``sd2``: SD 2.x. OpenCLIP ViT-H at ``cond_stage_model.model.`` (``conditioner.embedders.0.model.`` in the
  SGM layout); UNet cross-attention 1024 wide, linear projections, 64-wide heads, no class/ADM embedding.
  A file without a text encoder is told from SD 1.x by its UNet (1024-wide cross-attention or linear
  projections).
* ``sdxl``: SDXL base. CLIP-L at ``conditioner.embedders.0.transformer.`` and OpenCLIP bigG at
  ``conditioner.embedders.1.model.``; 2048-wide cross-attention, 2816-wide ADM (``label_emb``).
* ``sdxl_refiner``: bigG alone at ``conditioner.embedders.0.model.``; 1280-wide cross-attention, 2560-wide ADM.

Variants (decided when the model is loaded, from shapes and one small tensor):

* inpainting UNets take 9 input channels (4 latent + mask + 4 masked-image latent); 4 is the plain model.
  Other counts (5: SD 2 depth2img, 8: instruct-pix2pix, 7: the x4 upscaler) are refused.
* v-prediction: SD 2.x decides it like ComfyUI, from the weights: a 4-channel SD 2.x UNet whose
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` has a population standard deviation above 0.09 is
  v-prediction (the 768-v models), every other one eps (inpainting models always). A ``v_pred`` key (SDXL
  v-prediction finetunes) or our writer's embedded ``"prediction": "v"`` also mean v.

Everything else (SD 2.1 unCLIP, SD3, Flux, bare or diffusers-layout UNet files, ...) is refused by
:func:`detect_family` with one sentence: the file, what it looks like, what is supported. Only key names and
shapes are used, so the refusal comes before anything is read or built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.config import LATENT_SCALE, embedded_config
from airflow_comfy.runner.models.files import ModelFileError

Shape = Callable[[str], tuple[int, ...]]

SUPPORTED = ("SD 1.x, SD 2.x (512 eps, 768-v v-prediction, 9-channel inpainting) and SDXL base/refiner "
             "checkpoints, with their UNet under model.diffusion_model.")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner"}
INPAINT_CHANNELS = 9
V_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
"""The UNet tensor (without ``model.diffusion_model.``) whose spread tells SD 2.x v-prediction from eps."""
V_PROBE_STD = 0.09
_OTHER_INPUTS = {5: "depth-conditioned (depth2img) model", 7: "x4 upscaler", 8: "instruct-pix2pix model"}


def unsupported(label: str, what: str) -> ModelFileError:
    """The one-sentence refusal: ``label`` looks like ``what``; what is supported."""
    return ModelFileError(f"{label} looks like {what}, which CheckpointLoaderSimple does not run (supported: "
                          f"{SUPPORTED})")


def detect_family(keys: Iterable[str], shape: Shape | None = None, metadata: Mapping[str, str] | None = None, *,
                  label: str = "checkpoint") -> str:
    """``sd1``, ``sd2``, ``sdxl`` or ``sdxl_refiner`` from a single file's key names (and shapes, when given:
    they also decide SD 2.x in the SGM layout and refuse unsupported variants)."""
    embedded = embedded_config(metadata or {})
    if embedded and embedded.get("family") in LATENT_SCALE:
        return embedded["family"]
    keys = list(keys)
    _refuse_other_architectures(keys, label)
    family = _family_from_text_encoder(keys, shape) or _family_from_unet(keys, shape)
    if family is None:
        if any(k.startswith(layout.VAE_PREFIX) for k in keys):
            return "sd1"
        raise ModelFileError(f"{label}: not a Stable Diffusion checkpoint (no model.diffusion_model.*, "
                             f"first_stage_model.* or text-encoder keys; first keys: {', '.join(sorted(keys)[:3])})")
    if shape is not None:
        check_unet_variant(keys, shape, family, label=label)
    return family


def _has(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _refuse_other_architectures(keys: list[str], label: str) -> None:
    for marker, what in (("double_blocks.", "a Flux model"), ("joint_blocks.", "an SD3 model")):
        if _has(keys, layout.UNET_PREFIX + marker) or _has(keys, marker):
            raise unsupported(label, what)
    if _has(keys, layout.UNET_PREFIX) or _has(keys, "cond_stage_model.") or _has(keys, "conditioner."):
        return
    if "input_blocks.0.0.weight" in keys:
        raise unsupported(label, "a bare UNet (diffusion model only, keys without the model.diffusion_model. "
                                 "prefix: a UNETLoader file)")
    if "conv_in.weight" in keys and _has(keys, "down_blocks."):
        raise unsupported(label, "a diffusers-layout UNet (diffusion_pytorch_model.safetensors: use the whole "
                                 "diffusers folder)")


def _width(keys: list[str], shape: Shape | None, key: str) -> int | None:
    return shape(key)[1] if shape is not None and key in keys else None


def _family_from_text_encoder(keys: list[str], shape: Shape | None) -> str | None:
    if _has(keys, layout.SDXL_CLIP_G_PREFIX) or _has(keys, layout.SDXL_CLIP_L_PREFIX):
        return "sdxl"
    if _has(keys, layout.SD2_SGM_CLIP_PREFIX):
        return _sgm_single_encoder(keys, shape)
    if _has(keys, layout.SD2_CLIP_PREFIX):
        return "sd2"
    if _has(keys, layout.SD1_CLIP_PREFIX):
        return "sd1"
    return None


def _sgm_single_encoder(keys: list[str], shape: Shape | None) -> str:
    """One OpenCLIP at ``conditioner.embedders.0.model.``: the SDXL refiner (its UNet has an ADM input) or SD 2.x
    saved in the SGM layout (no ADM; text width 1024)."""
    if _has(keys, layout.UNET_PREFIX):
        return "sdxl_refiner" if layout.UNET_PREFIX + "label_emb.0.0.weight" in keys else "sd2"
    width = _width(keys, shape, layout.SD2_SGM_CLIP_PREFIX + "token_embedding.weight")
    return "sd2" if width == 1024 else "sdxl_refiner"


def _family_from_unet(keys: list[str], shape: Shape | None) -> str | None:
    if not _has(keys, layout.UNET_PREFIX + "input_blocks."):
        return None
    cross = _cross_attention_width(keys, shape)
    if layout.UNET_PREFIX + "label_emb.0.0.weight" in keys:
        if cross == 1024:
            return "sd2"  # unCLIP: refused by check_unet_variant
        return "sdxl_refiner" if cross == 1280 else "sdxl"
    return "sd2" if cross == 1024 or _linear_projections(keys, shape) else "sd1"


def _linear_projections(keys: list[str], shape: Shape | None) -> bool:
    """SD 2.x's transformers project in and out with linear layers, SD 1.x's with 1x1 convolutions."""
    key = next((k for k in keys if k.startswith(layout.UNET_PREFIX) and k.endswith("proj_in.weight")), None)
    return shape is not None and key is not None and len(shape(key)) == 2


def _cross_attention_width(keys: list[str], shape: Shape | None) -> int | None:
    if shape is None:
        return None
    key = next((k for k in keys if k.startswith(layout.UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    return shape(key)[1] if key is not None else None


def check_unet_variant(keys: Iterable[str], shape: Shape, family: str, *, label: str = "checkpoint") -> None:
    """Refuse the UNets of ``family`` we do not run (unCLIP, depth2img, pix2pix, upscaler, a text encoder of
    another family), from shapes only."""
    keys = list(keys)
    conv_in = layout.UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in keys:
        return
    name = FAMILY_NAMES[family]
    adm = _width(keys, shape, layout.UNET_PREFIX + "label_emb.0.0.weight")
    if adm is not None and family in ("sd1", "sd2"):
        what = "an SD 2.1 unCLIP checkpoint" if family == "sd2" else "an SD 1.x-style UNet with a class embedding"
        raise unsupported(label, f"{what} (its UNet takes a {adm}-wide image/class embedding)")
    channels = shape(conv_in)[1]
    if channels not in (4, INPAINT_CHANNELS):
        kind = _OTHER_INPUTS.get(channels, "UNet")
        raise unsupported(label, f"an {name} {kind} ({channels} UNet input channels; 4, or 9 for inpainting, run)")
    cross = _cross_attention_width(keys, shape)
    expected = {"sd1": 768, "sd2": 1024}.get(family)
    if expected is not None and cross in (768, 1024) and cross != expected:
        other = "SD 2.x" if cross == 1024 else "SD 1.x"
        raise unsupported(label, f"a mixed checkpoint: an {name} text encoder with an {other} UNet "
                                 f"({cross}-wide cross-attention)")


def detect_prediction(family: str, unet: Mapping[str, torch.Tensor], *, in_channels: int, prefix: str = "",
                      v_pred_key: bool = False, embedded: str | None = None) -> str:
    """``v`` or ``eps`` for a UNet state dict in LDM names, each starting with ``prefix`` (see the module
    docstring)."""
    if embedded in ("v", "eps"):
        return embedded
    if v_pred_key:
        return "v"
    if family == "sd2" and in_channels == 4:
        probe = unet.get(prefix + V_PROBE)
        if probe is not None and torch.std(probe.float(), unbiased=False).item() > V_PROBE_STD:
            return "v"
    return "eps"
