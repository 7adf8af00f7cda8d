"""Diffusers pipeline folders (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder[_2]/``,
``tokenizer[_2]/``): single, fp16-variant or sharded safetensors per component."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models.building import build_text_encoder, build_unet, build_vae
from airflow_comfy.runner.models.config import LATENT_SCALE, _public
from airflow_comfy.runner.models.files import ModelFileError, TensorReader, _label, is_pickle_file
from airflow_comfy.runner.models.loaded import LoadedCheckpoint
from airflow_comfy.runner.models.tokenizers import load_tokenizer, tokenizer_from_dir
from airflow_comfy.runner.values import DiffusionModel, Recipe, TextEncoder, VAEModel


def read_component_weights(folder: Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """The weights of one diffusers/transformers component folder (single, fp16-variant or sharded safetensors)."""
    candidates = sorted(folder.glob("*.safetensors.index.json"))
    if candidates:
        index = json.loads(candidates[0].read_text(encoding="utf-8"))
        files = sorted(set(index.get("weight_map", {}).values()))
        paths = [folder / f for f in files]
    else:
        singles = [p for p in sorted(folder.glob("*.safetensors"))]
        plain = [p for p in singles if p.name in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
        paths = plain[:1] or singles[:1]
        if not paths:
            pickles = [p for p in sorted(folder.iterdir()) if is_pickle_file(p)]
            if pickles and allow_pickle:
                paths = pickles[:1]
            elif pickles:
                raise ModelFileError(f"{_label(pickles[0])}: only pickle weights ({pickles[0].name}); refusing "
                                     f"to load them (convert to safetensors or allow pickle files)")
            else:
                raise ModelFileError(f"{_label(folder)}: no weights (*.safetensors) in the component folder")
    state: dict[str, torch.Tensor] = {}
    read = 0
    for p in paths:
        with TensorReader(p, allow_pickle=allow_pickle) as reader:
            state.update(reader.read())
            read += reader.tensors_read
    return state, read


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{_label(path)}: cannot read {path.name}: {exc}") from exc


def _load_diffusers_folder(path: Path, components: frozenset[str], *, name: str, models_root: Path | None,
                           allow_pickle: bool, device: torch.device | str, dtype: torch.dtype,
                           vae_dtype: torch.dtype) -> LoadedCheckpoint:
    label = _label(path)
    index = _json(path / "model_index.json")
    cls = str(index.get("_class_name", ""))

    def present(component: str) -> bool:
        entry = index.get(component)
        return isinstance(entry, list) and entry[0] is not None and (path / component).is_dir()

    if "XL" in cls:
        family = "sdxl" if present("text_encoder") else "sdxl_refiner"
    elif cls.startswith("StableDiffusion") and "3" not in cls:
        family = "sd1"
    else:
        raise ModelFileError(f"{label}: diffusers pipeline {cls or '?'} is not supported (SD 1.x and SDXL only)")
    recipe = Recipe("CheckpointLoaderSimple", name)
    read = 0
    model = clip = vae = None
    if "MODEL" in components:
        config = _json(path / "unet" / "config.json")
        weights, n = read_component_weights(path / "unet", allow_pickle=allow_pickle)
        read += n
        if family == "sd1" and config.get("cross_attention_dim") == 1024:
            raise ModelFileError(f"{label}: SD 2.x models are not supported yet")
        unet = build_unet(_public(config), weights, label=label, device=device, dtype=dtype)
        scheduler = path / "scheduler" / "scheduler_config.json"
        prediction = "eps"
        if scheduler.is_file() and _json(scheduler).get("prediction_type") == "v_prediction":
            prediction = "v"
        model = DiffusionModel(unet=unet, family=family, latent_scale=LATENT_SCALE[family], recipe=recipe,
                               prediction=prediction)
    if "VAE" in components:
        config = _public(_json(path / "vae" / "config.json"))
        weights, n = read_component_weights(path / "vae", allow_pickle=allow_pickle)
        read += n
        scale = float(config.get("scaling_factor", LATENT_SCALE[family]))
        vae = VAEModel(vae=build_vae(config, _rename_old_vae_attention(weights), label=label, device=device,
                                     dtype=vae_dtype), latent_scale=scale, recipe=recipe)
    if "CLIP" in components:
        models: list[torch.nn.Module] = []
        tokenizers: list[Any] = []
        roles = [r for r in ("text_encoder", "text_encoder_2") if present(r)]
        if not roles:
            raise ModelFileError(f"{label}: the diffusers folder has no text encoder")
        for role in roles:
            config = _json(path / role / "config.json")
            weights, n = read_component_weights(path / role, allow_pickle=allow_pickle)
            read += n
            architectures = config.get("architectures") or []
            with_projection = "CLIPTextModelWithProjection" in architectures or (
                not architectures and role == "text_encoder_2")
            models.append(build_text_encoder(config, weights, with_projection=with_projection, label=label,
                                             device=device, dtype=dtype))
            tok_dir = path / role.replace("text_encoder", "tokenizer")
            max_len = int(config.get("max_position_embeddings", 77))
            if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
                tokenizer = tokenizer_from_dir(tok_dir, model_max_length=max_len)
                if len(tokenizer) != config.get("vocab_size", len(tokenizer)):
                    raise ModelFileError(f"{label}: {tok_dir.name} has {len(tokenizer)} tokens, the text encoder "
                                         f"{config.get('vocab_size')}")
            else:
                tokenizer = load_tokenizer(path, models_root, vocab_size=int(config.get("vocab_size", 49408)),
                                           pad_token="!" if role == "text_encoder_2" else None,
                                           model_max_length=max_len, label=label)
            tokenizers.append(tokenizer)
        embeddings = models_root / "embeddings" if models_root is not None else None
        clip = TextEncoder(tokenizers=tokenizers, models=models, family=family, recipe=recipe,
                           embeddings_dir=str(embeddings) if embeddings is not None and embeddings.is_dir() else None)
    return LoadedCheckpoint(model=model, clip=clip, vae=vae, family=family, components=components, path=path,
                            tensors_read=read, tensors_total=read)


def _rename_old_vae_attention(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE attention names (query/key/value/proj_attn) -> current ones."""
    out = {}
    for key, value in weights.items():
        if ".mid_block.attentions." in key:
            for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                             (".proj_attn.", ".to_out.0.")):
                key = key.replace(old, new)
            if key.endswith(".weight") and value.ndim == 4 and ".to_" in key:
                value = value[:, :, 0, 0]
        out[key] = value
    return out
