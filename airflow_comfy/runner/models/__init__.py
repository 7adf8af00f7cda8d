"""Model loading for the runner: checkpoints, VAEs, LoRAs, ControlNets, ESRGAN upscalers, embeddings, demo models.

Two levels:

* run level (what node implementations call): ``load_checkpoint(ctx, ckpt_name, components)``,
  ``load_vae(ctx, vae_name)``, ``apply_lora(ctx, model, clip, lora_name, strength_model, strength_clip)``,
  ``load_control_net(ctx, recipe_or_name)``, ``load_upscale_model(ctx, model_name)``,
  ``load_embedding(ctx, name)``. ``ctx`` is a :class:`~airflow_comfy.runner.context.RunContext` (``models_root``,
  ``allow_pickle``, ``device``, ``dtype``, ``model_files``): names are resolved and confined to their folder
  under ``models_root`` and each file's SHA-256 is recorded in ``ctx.model_files``.
* file level: ``load_checkpoint_file(path, components, ...)``, ``load_vae_file``, ``apply_lora_file``,
  ``load_controlnet_file``, ``load_upscale_model_file``, ``load_embedding_file``.

Importing this package is cheap: torch is imported, diffusers/transformers only when a model is loaded.
"""

from __future__ import annotations

from airflow_comfy.runner.models.checkpoint import (
    ALL_COMPONENTS,
    LoadedCheckpoint,
    clear_cache,
    load_checkpoint,
    load_checkpoint_file,
)
from airflow_comfy.runner.models.config import LATENT_SCALE, shipped_config
from airflow_comfy.runner.models.controlnet import (
    control_residuals,
    load_control_net,
    load_controlnet_file,
    prepare_hint,
)
from airflow_comfy.runner.models.demo import make_demo_models
from airflow_comfy.runner.models.embeddings import load_embedding, load_embedding_file
from airflow_comfy.runner.models.esrgan import (
    RRDBNet,
    build_rrdbnet,
    load_upscale_model,
    load_upscale_model_file,
    upscale_image,
)
from airflow_comfy.runner.models.families import detect_family
from airflow_comfy.runner.models.files import (
    MODEL_FOLDERS,
    ModelFileError,
    list_model_files,
    read_state_dict,
    resolve_model_file,
    sha256_of,
)
from airflow_comfy.runner.models.lora import apply_lora, apply_lora_file, apply_lora_state_dict
from airflow_comfy.runner.models.tokenizers import load_tokenizer
from airflow_comfy.runner.models.vae_file import load_vae, load_vae_file

__all__ = [
    "ALL_COMPONENTS",
    "LATENT_SCALE",
    "MODEL_FOLDERS",
    "LoadedCheckpoint",
    "ModelFileError",
    "RRDBNet",
    "apply_lora",
    "apply_lora_file",
    "apply_lora_state_dict",
    "build_rrdbnet",
    "clear_cache",
    "control_residuals",
    "detect_family",
    "list_model_files",
    "load_checkpoint",
    "load_checkpoint_file",
    "load_control_net",
    "load_controlnet_file",
    "load_embedding",
    "load_embedding_file",
    "load_tokenizer",
    "load_upscale_model",
    "load_upscale_model_file",
    "load_vae",
    "load_vae_file",
    "make_demo_models",
    "prepare_hint",
    "read_state_dict",
    "resolve_model_file",
    "sha256_of",
    "shipped_config",
    "upscale_image",
]
