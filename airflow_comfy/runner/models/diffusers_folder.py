"""Diffusers pipeline folders (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder[_2]/``,
``tokenizer[_2]/``): single, fp16-variant or sharded safetensors per component. SD 1.x, SD 2.x (UNet
cross-attention 1024 wide), SDXL base and refiner pipelines; the family and the refusals come from
``model_index.json`` and ``unet/config.json`` alone."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.building import build_text_encoder, build_unet, build_vae
from airflow_comfy.runner.models.config import LATENT_SCALE, _public
from airflow_comfy.runner.models.families import INPAINT_CHANNELS, V_PROBE, detect_prediction, unsupported
from airflow_comfy.runner.models.files import ModelFileError, TensorReader, _label, is_pickle_file
from airflow_comfy.runner.models.loaded import LoadedCheckpoint
from airflow_comfy.runner.models.tokenizers import load_tokenizer, text_encoder_name, tokenizer_from_dir
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

    unet_config = _json(path / "unet" / "config.json") if (path / "unet" / "config.json").is_file() else {}
    family = _folder_family(cls, present("text_encoder"), unet_config, label)
    recipe = Recipe("CheckpointLoaderSimple", name)
    read = 0
    model = clip = vae = None
    if "MODEL" in components:
        config = _public(unet_config or _json(path / "unet" / "config.json"))
        if family == "sd2":
            config["upcast_attention"] = True  # ComfyUI computes SD 2.x attention in float32
        weights, n = read_component_weights(path / "unet", allow_pickle=allow_pickle)
        read += n
        prediction = _folder_prediction(path, family, config, weights)
        unet = build_unet(config, weights, label=label, device=device, dtype=dtype)
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
            encoder = build_text_encoder(config, weights, with_projection=with_projection, label=label,
                                         device=device, dtype=dtype)
            _mark_dropped_layers(encoder, config, family)
            models.append(encoder)
            tok_dir = path / role.replace("text_encoder", "tokenizer")
            max_len = int(config.get("max_position_embeddings", 77))
            if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
                tokenizer = tokenizer_from_dir(tok_dir, model_max_length=max_len)
                if len(tokenizer) != config.get("vocab_size", len(tokenizer)):
                    raise ModelFileError(f"{label}: {tok_dir.name}/ has {len(tokenizer)} tokens, the "
                                         f"{text_encoder_name(family, role)} in {role}/ "
                                         f"{config.get('vocab_size')}: give {tok_dir.name}/ that encoder's "
                                         f"vocab.json and merges.txt")
            else:
                open_clip = role == "text_encoder_2" or family == "sd2"
                tokenizer = load_tokenizer(path, models_root, vocab_size=int(config.get("vocab_size", 49408)),
                                           pad_token="!" if open_clip else None,
                                           model_max_length=max_len, label=label,
                                           encoder=text_encoder_name(family, role))
            tokenizers.append(tokenizer)
        embeddings = models_root / "embeddings" if models_root is not None else None
        clip = TextEncoder(tokenizers=tokenizers, models=models, family=family, recipe=recipe,
                           embeddings_dir=str(embeddings) if embeddings is not None and embeddings.is_dir() else None)
    return LoadedCheckpoint(model=model, clip=clip, vae=vae, family=family, components=components, path=path,
                            tensors_read=read, tensors_total=read)


SD2_TEXT_LAYERS = 24
"""OpenCLIP ViT-H's text layers; diffusers' SD 2.x text encoders store the first 23."""


def _folder_family(cls: str, has_text_encoder: bool, unet_config: Mapping[str, Any], label: str) -> str:
    """The family of a diffusers pipeline folder, from ``model_index.json``'s class and the UNet config; the
    UNet variants we do not run are refused here, before any weight is read."""
    if "XL" in cls:
        family = "sdxl" if has_text_encoder else "sdxl_refiner"
    elif cls.startswith("StableDiffusion") and "3" not in cls and "UnCLIP" not in cls and "Upscale" not in cls:
        sd2 = unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection")
        family = "sd2" if sd2 else "sd1"  # SD 1.x UNets: 768-wide cross-attention, convolutional projections
    else:
        raise unsupported(label, f"a diffusers {cls or 'pipeline of an unknown class'}")
    channels = unet_config.get("in_channels", 4)
    if channels not in (4, INPAINT_CHANNELS):
        raise unsupported(label, f"a diffusers {cls} with {channels} UNet input channels")
    if family in ("sd1", "sd2") and (unet_config.get("class_embed_type") or unet_config.get("addition_embed_type")):
        raise unsupported(label, f"a diffusers {cls} whose UNet takes a class/image embedding")
    return family


def _folder_prediction(path: Path, family: str, config: Mapping[str, Any],
                       weights: Mapping[str, torch.Tensor]) -> str:
    """``v`` when the scheduler says ``v_prediction``; SD 2.x also by ComfyUI's weight test (:mod:`.families`)."""
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file() and _json(scheduler).get("prediction_type") == "v_prediction":
        return "v"
    probe = next((k for k, ldm in layout.unet_key_map(weights).items() if ldm == V_PROBE), None)
    ldm = {V_PROBE: weights[probe]} if probe is not None else {}
    return detect_prediction(family, ldm, in_channels=int(config.get("in_channels", 4)))


def _mark_dropped_layers(encoder: torch.nn.Module, config: Mapping[str, Any], family: str) -> None:
    """Diffusers' SD 2.x text encoder (1024 wide, 23 layers) lacks ViT-H's last layer: CLIP layer indices count
    it all the same, as ComfyUI's do (:data:`airflow_comfy.runner.text.DROPPED_LAYERS_ATTR`)."""
    from airflow_comfy.runner.text import DROPPED_LAYERS_ATTR

    layers = int(config.get("num_hidden_layers", SD2_TEXT_LAYERS))
    if family == "sd2" and config.get("hidden_size") == 1024 and layers < SD2_TEXT_LAYERS:
        setattr(encoder, DROPPED_LAYERS_ATTR, SD2_TEXT_LAYERS - layers)


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
