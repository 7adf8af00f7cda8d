"""CheckpointLoaderSimple and VAELoader: single-file (ComfyUI/LDM layout) checkpoints and diffusers folders into
the runner's containers (:class:`~airflow_comfy.runner.values.DiffusionModel`, ``TextEncoder``, ``VAEModel``).

Single files are read with ``safetensors.safe_open``, and only the tensors of the requested components
(``components`` ⊆ ``{"MODEL", "CLIP", "VAE"}``): a group that only decodes reads only ``first_stage_model.*``.
The LDM tensors are converted with diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), the modules
are built from a config on the ``meta`` device and the converted tensors assigned to them — no hub access,
no random initialisation.

Where the configs come from, in order:

1. The file's own config: a safetensors ``__metadata__`` entry ``"airflow_comfy"`` holding JSON
   ``{"format": 1, "family": ..., "configs": {"unet": {...}, "vae": {...}, "text_encoder": {...},
   "text_encoder_2": {...}}}``. Our writer (:mod:`.demo`) stores it; it is authoritative when present.
2. Otherwise the tensor shapes (block channels, layers per block, transformer depths, cross-attention width,
   linear/conv projections, SDXL's size embedding, CLIP widths/layers/positions/vocabulary) over the shipped
   config of the detected family (``configs/sd15``, ``configs/sdxl``), which supplies what shapes cannot tell
   (attention heads, activation, token ids). Models of another size than the shipped one get 64-wide
   attention heads (8-wide below 64 channels; SD 1.x always 8 heads).

Families: ``sd1`` (SD 1.x), ``sdxl`` (SDXL base: CLIP-L + OpenCLIP bigG), ``sdxl_refiner`` (bigG only).
SD 2.x, SD3, Flux and other families are refused with a clear message.

Tokenizers: real checkpoints need CLIP's real BPE vocabulary (49,408 tokens), which is not shipped. It is
looked up in ``<models>/tokenizers/<checkpoint stem>/``, then a ``tokenizer/`` folder beside the checkpoint,
then ``<models>/tokenizers/clip/`` (each: ``vocab.json`` + ``merges.txt`` [+ ``tokenizer_config.json``]), then
the BPE file of the ``openai-clip`` package if it is installed (not imported). A diffusers folder's own
``tokenizer/`` comes first. The tokenizer's vocabulary size must match the text encoder's.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.cache import ModelCache, clear_all
from airflow_comfy.runner.models.files import (
    ModelFileError,
    TensorReader,
    _label,
    file_key,
    is_pickle_file,
    models_root_of,
    resolve_model_file,
    sha256_of,
)
from airflow_comfy.runner.values import DiffusionModel, Recipe, TextEncoder, VAEModel

log = logging.getLogger(__name__)

ALL_COMPONENTS = frozenset({"MODEL", "CLIP", "VAE"})
LATENT_SCALE = {"sd1": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}
META_KEY = "airflow_comfy"
META_FORMAT = 1
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
_CONFIG_DIR = Path(__file__).with_name("configs")
_FAMILY_DIR = {"sd1": "sd15", "sdxl": "sdxl"}
_CACHE_SIZE = 2


@dataclass
class LoadedCheckpoint:
    """What CheckpointLoaderSimple returns; components that were not requested are ``None``."""

    model: DiffusionModel | None
    clip: TextEncoder | None
    vae: VAEModel | None
    family: str
    components: frozenset[str]
    path: Path
    tensors_read: int = 0
    """Tensors read from the file(s) for this load (0 when served from the cache)."""
    tensors_total: int = 0
    from_cache: bool = False

    def outputs(self) -> tuple[DiffusionModel | None, TextEncoder | None, VAEModel | None]:
        return self.model, self.clip, self.vae


# --- configs ---------------------------------------------------------------------------------------------------


@cache
def _shipped(family: str, name: str) -> dict:
    folder = _FAMILY_DIR.get(family)
    if folder is None:
        return {}
    path = _CONFIG_DIR / folder / f"{name}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_config(family: str, name: str) -> dict:
    """A copy of a shipped config (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer_config``
    ...) of ``sd1`` or ``sdxl``; ``{}`` when there is none."""
    return json.loads(json.dumps(_shipped(family, name)))


def embedded_config(metadata: Mapping[str, str]) -> dict | None:
    """The config our writer embeds in ``__metadata__`` (see the module docstring), or None."""
    raw = metadata.get(META_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != META_FORMAT:
        return None
    return data


def _public(config: Mapping[str, Any]) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _unet_config(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict:
    derived = layout.unet_config_from_ldm(shapes, family=family)
    config = _public(shipped_config(family, "unet"))
    if config.get("block_out_channels") == derived["block_out_channels"]:
        derived.pop("attention_head_dim")
        if "addition_time_embed_dim" in config:
            derived.pop("addition_time_embed_dim", None)
    config.update(derived)
    config.setdefault("sample_size", 128 if family.startswith("sdxl") else 64)
    return config


def _vae_config(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict:
    config = _public(shipped_config(family, "vae"))
    config.update(layout.vae_config_from_ldm(shapes))
    config["scaling_factor"] = LATENT_SCALE.get(family, 0.18215)
    config.setdefault("sample_size", 1024 if family.startswith("sdxl") else 512)
    return config


_CLIP_DROP = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


def _clip_config(shapes: Mapping[str, tuple[int, ...]], family: str, role: str) -> dict:
    derived = layout.clip_config_from_hf(shapes, hidden_act="gelu" if role == "text_encoder_2" else "quick_gelu")
    base = {k: v for k, v in shipped_config(family, role).items() if k not in _CLIP_DROP}
    if base and all(base.get(k) == derived[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")):
        derived.pop("num_attention_heads")
        base.update(derived)
        return base
    vocab = derived["vocab_size"]
    derived.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return derived


# --- building modules ------------------------------------------------------------------------------------------


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


# --- tokenizers ------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table, printable bytes first."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def make_clip_tokenizer(vocab: Mapping[str, int], merges: list[tuple[str, str]], *, pad_token: str = CLIP_EOS,
                        model_max_length: int = 77) -> Any:
    """A transformers CLIPTokenizer built in memory from a CLIP-layout vocabulary and BPE merges."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                             model_max_length=model_max_length)
    except TypeError:  # transformers 4: file-based constructor
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            vocab_file = Path(tmp) / "vocab.json"
            merges_file = Path(tmp) / "merges.txt"
            vocab_file.write_text(json.dumps(dict(vocab)), encoding="utf-8")
            merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
            return CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), pad_token=pad_token,
                                 model_max_length=model_max_length)


def read_merges(text: str) -> list[tuple[str, str]]:
    merges = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        first, _, second = line.strip().partition(" ")
        if second:
            merges.append((first, second))
    return merges


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


_TOKENIZER_CACHE: dict[tuple, Any] = {}
_TOKENIZER_LOCK = threading.Lock()


def tokenizer_from_dir(folder: Path, *, pad_token: str | None = None, model_max_length: int = 77) -> Any:
    """A CLIPTokenizer from ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json`` for the pad token)."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    pad = pad_token or _token_text(config.get("pad_token")) or CLIP_EOS
    key = (file_key(folder), pad, model_max_length)
    with _TOKENIZER_LOCK:
        if key in _TOKENIZER_CACHE:
            return _TOKENIZER_CACHE[key]
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = read_merges((folder / "merges.txt").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"tokenizer {folder}: cannot read vocab.json/merges.txt: {exc}") from exc
    tokenizer = make_clip_tokenizer(vocab, merges, pad_token=pad, model_max_length=model_max_length)
    with _TOKENIZER_LOCK:
        _TOKENIZER_CACHE[key] = tokenizer
    return tokenizer


def openai_clip_bpe_file() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` of the ``openai-clip`` package, when installed (never imported: its
    ``__init__`` needs torchvision)."""
    try:
        spec = importlib.util.find_spec("clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


def tokenizer_from_bpe_gz(path: Path, *, pad_token: str = CLIP_EOS, model_max_length: int = 77) -> Any:
    """The real CLIP tokenizer (49,408 tokens) from OpenAI's BPE merges file."""
    key = (file_key(path), pad_token, model_max_length)
    with _TOKENIZER_LOCK:
        if key in _TOKENIZER_CACHE:
            return _TOKENIZER_CACHE[key]
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    tokenizer = make_clip_tokenizer({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad_token,
                                    model_max_length=model_max_length)
    with _TOKENIZER_LOCK:
        _TOKENIZER_CACHE[key] = tokenizer
    return tokenizer


def tokenizer_search_dirs(path: Path, models_root: Path | None) -> list[Path]:
    """Where the CLIP tokenizer of checkpoint ``path`` is looked for, in order."""
    dirs: list[Path] = []
    if path.is_dir():
        dirs.append(path / "tokenizer")
    stem = path.name if path.is_dir() else path.stem
    if models_root is not None:
        dirs.append(models_root / "tokenizers" / stem)
    dirs.append(path.parent / "tokenizer")
    if models_root is not None:
        dirs.append(models_root / "tokenizers" / "clip")
    return dirs


def load_tokenizer(path: Path, models_root: Path | None, *, vocab_size: int, pad_token: str | None = None,
                   model_max_length: int = 77, label: str | None = None) -> Any:
    """The CLIP tokenizer for checkpoint ``path``; its vocabulary must have ``vocab_size`` tokens."""
    label = label or _label(path)
    searched = tokenizer_search_dirs(path, models_root)
    tokenizer = None
    source = ""
    for folder in searched:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = tokenizer_from_dir(folder, pad_token=pad_token, model_max_length=model_max_length)
            source = str(folder)
            break
    if tokenizer is None:
        bpe = openai_clip_bpe_file()
        if bpe is not None and vocab_size == 49408:
            tokenizer = tokenizer_from_bpe_gz(bpe, pad_token=pad_token or CLIP_EOS,
                                              model_max_length=model_max_length)
            source = str(bpe)
    if tokenizer is None:
        where = ", ".join(str(d) for d in searched)
        raise ModelFileError(
            f"{label}: no CLIP tokenizer found (searched {where}). Real SD 1.x/SDXL checkpoints need CLIP's BPE "
            f"vocabulary: put vocab.json and merges.txt (e.g. from the tokenizer/ folder of a diffusers SD 1.5 "
            f"model) into <models>/tokenizers/clip/, or install the 'openai-clip' package, which ships "
            f"bpe_simple_vocab_16e6.txt.gz")
    if len(tokenizer) != vocab_size:
        raise ModelFileError(
            f"{label}: the tokenizer from {source} has {len(tokenizer)} tokens but the text encoder has "
            f"{vocab_size}; a made-up vocabulary gives wrong text embeddings. Provide the matching vocab.json and "
            f"merges.txt (real SD 1.x/SDXL: CLIP's 49,408-token BPE) in <models>/tokenizers/clip/")
    return tokenizer


# --- family detection ------------------------------------------------------------------------------------------


def detect_family(keys: Iterable[str], shape: Callable[[str], tuple[int, ...]] | None = None,
                  metadata: Mapping[str, str] | None = None, *, label: str = "checkpoint") -> str:
    """``sd1``, ``sdxl`` or ``sdxl_refiner`` from a single file's key names (and shapes when needed)."""
    embedded = embedded_config(metadata or {})
    if embedded and embedded.get("family") in LATENT_SCALE:
        return embedded["family"]
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(layout.SDXL_CLIP_G_PREFIX):
        return "sdxl"
    if has(layout.REFINER_CLIP_G_PREFIX):
        return "sdxl_refiner"
    if has(layout.SDXL_CLIP_L_PREFIX):
        return "sdxl"
    if has("cond_stage_model.model."):
        raise ModelFileError(f"{label}: SD 2.x checkpoints (OpenCLIP-H text encoder) are not supported yet")
    if has(layout.SD1_CLIP_PREFIX):
        return "sd1"
    if has(layout.UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        raise ModelFileError(f"{label}: Flux models are not supported (only SD 1.x and SDXL checkpoints)")
    if has(layout.UNET_PREFIX + "joint_blocks.") or has("joint_blocks."):
        raise ModelFileError(f"{label}: SD3 models are not supported (only SD 1.x and SDXL checkpoints)")
    if has(layout.UNET_PREFIX + "input_blocks."):
        if layout.UNET_PREFIX + "label_emb.0.0.weight" in keys:
            return "sdxl"
        if shape is not None:
            cross = next((shape(k)[1] for k in keys if k.endswith("attn2.to_k.weight")), None)
            if cross == 1024:
                raise ModelFileError(f"{label}: SD 2.x checkpoints are not supported yet")
        return "sd1"
    if has(layout.VAE_PREFIX):
        return "sd1"
    raise ModelFileError(f"{label}: not a Stable Diffusion 1.x/SDXL checkpoint (no model.diffusion_model.*, "
                         f"first_stage_model.* or text-encoder keys; first keys: {', '.join(sorted(keys)[:3])})")


# --- single files ----------------------------------------------------------------------------------------------


def _strip(prefix: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def _read_prefixed(reader: TensorReader, prefix: str) -> dict[str, torch.Tensor]:
    return reader.read(prefix)


class _ShapeOnly:
    """Stands in for a text model in diffusers' open-clip converter (it only reads ``config.hidden_size``)."""

    def __init__(self, hidden_size: int) -> None:
        self.config = type("Config", (), {"hidden_size": hidden_size})()


def _convert_clip_l(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return layout.hf_clip_keys(convert_ldm_clip_checkpoint(dict(raw)))


def _convert_clip_g(raw: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    hidden = raw[prefix + "token_embedding.weight"].shape[1]
    converted = convert_open_clip_checkpoint(_ShapeOnly(hidden), dict(raw), prefix=prefix)
    return {k: v for k, v in converted.items() if v is not None}


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _load_single_file(path: Path, components: frozenset[str], *, name: str, models_root: Path | None,
                      allow_pickle: bool, device: torch.device | str, dtype: torch.dtype,
                      vae_dtype: torch.dtype) -> LoadedCheckpoint:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    label = _label(path)
    with TensorReader(path, allow_pickle=allow_pickle) as reader:
        family = detect_family(reader.keys, reader.shape, reader.metadata, label=label)
        embedded = embedded_config(reader.metadata) or {}
        configs = embedded.get("configs", {})
        recipe = Recipe("CheckpointLoaderSimple", name)
        model = clip = vae = None

        if "MODEL" in components:
            unet_keys = [k for k in reader.keys if k.startswith(layout.UNET_PREFIX)]
            if not unet_keys:
                raise ModelFileError(f"{label}: the checkpoint has no diffusion model (model.diffusion_model.*)")
            config = configs.get("unet") or _unet_config(
                {k[len(layout.UNET_PREFIX):]: reader.shape(k) for k in unet_keys}, family)
            raw = _read_prefixed(reader, layout.UNET_PREFIX)
            converted = convert_ldm_unet_checkpoint(raw, config)
            del raw
            unet = build_unet(config, converted, label=label, device=device, dtype=dtype)
            del converted
            prediction = "v" if ("v_pred" in reader or embedded.get("prediction") == "v") else "eps"
            model = DiffusionModel(unet=unet, family=family, latent_scale=LATENT_SCALE[family], recipe=recipe,
                                   prediction=prediction)

        if "VAE" in components:
            vae_keys = [k for k in reader.keys if k.startswith(layout.VAE_PREFIX)]
            if not vae_keys:
                raise ModelFileError(f"{label}: the checkpoint has no VAE (first_stage_model.*)")
            config = configs.get("vae") or _vae_config(
                {k[len(layout.VAE_PREFIX):]: reader.shape(k) for k in vae_keys}, family)
            raw = _read_prefixed(reader, layout.VAE_PREFIX)
            converted = convert_ldm_vae_checkpoint(raw, config)
            del raw
            module = build_vae(config, converted, label=label, device=device, dtype=vae_dtype)
            vae = VAEModel(vae=module, latent_scale=float(config.get("scaling_factor", LATENT_SCALE[family])),
                           recipe=recipe)

        if "CLIP" in components:
            clip = _load_single_file_clip(reader, family, configs, path=path, models_root=models_root,
                                          label=label, recipe=recipe, device=device, dtype=dtype)
        return LoadedCheckpoint(model=model, clip=clip, vae=vae, family=family, components=components, path=path,
                                tensors_read=reader.tensors_read, tensors_total=len(reader.keys))


def _load_single_file_clip(reader: TensorReader, family: str, configs: Mapping[str, Any], *, path: Path,
                           models_root: Path | None, label: str, recipe: Recipe, device: torch.device | str,
                           dtype: torch.dtype) -> TextEncoder:
    models: list[torch.nn.Module] = []
    tokenizers: list[Any] = []
    if family == "sd1":
        parts = [("text_encoder", layout.SD1_CLIP_PREFIX, False)]
    elif family == "sdxl":
        parts = [("text_encoder", layout.SDXL_CLIP_L_PREFIX, False),
                 ("text_encoder_2", layout.SDXL_CLIP_G_PREFIX, True)]
    else:
        parts = [("text_encoder_2", layout.REFINER_CLIP_G_PREFIX, True)]
    for role, prefix, open_clip in parts:
        raw = _read_prefixed(reader, prefix)
        if not raw:
            raise ModelFileError(f"{label}: the checkpoint has no text encoder ({prefix}*)")
        converted = _convert_clip_g(raw, prefix) if open_clip else _convert_clip_l(raw)
        del raw
        config = configs.get(role) or _clip_config(_shapes(converted), family, role)
        models.append(build_text_encoder(config, converted, with_projection=open_clip, label=label,
                                         device=device, dtype=dtype))
        tokenizer_config = shipped_config(family, "tokenizer_2_config" if role == "text_encoder_2"
                                          else "tokenizer_config")
        pad = _token_text(tokenizer_config.get("pad_token")) or ("!" if role == "text_encoder_2" else None)
        tokenizers.append(load_tokenizer(path, models_root, vocab_size=config["vocab_size"], pad_token=pad,
                                         model_max_length=config.get("max_position_embeddings", 77), label=label))
    embeddings = models_root / "embeddings" if models_root is not None else None
    return TextEncoder(tokenizers=tokenizers, models=models, family=family, recipe=recipe,
                       embeddings_dir=str(embeddings) if embeddings is not None and embeddings.is_dir() else None)


# --- diffusers folders -----------------------------------------------------------------------------------------


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


# --- the cache and the public entry points ---------------------------------------------------------------------

_CACHE: ModelCache[LoadedCheckpoint] = ModelCache(_CACHE_SIZE)


def clear_cache() -> None:
    """Forget every cached model: checkpoints, VAEs, tokenizers, ControlNets, upscalers (the next load reads the
    files again)."""
    clear_all()
    with _TOKENIZER_LOCK:
        _TOKENIZER_CACHE.clear()


def cached_entries() -> list[tuple]:
    return _CACHE.keys()


def _subset(entry: LoadedCheckpoint, components: frozenset[str]) -> LoadedCheckpoint:
    """Fresh containers (sharing the modules) for the requested components of a cached load."""
    return LoadedCheckpoint(
        model=replace(entry.model) if entry.model is not None and "MODEL" in components else None,
        clip=replace(entry.clip, tokenizers=list(entry.clip.tokenizers), models=list(entry.clip.models))
        if entry.clip is not None and "CLIP" in components else None,
        vae=replace(entry.vae) if entry.vae is not None and "VAE" in components else None,
        family=entry.family, components=components, path=entry.path, tensors_read=0,
        tensors_total=entry.tensors_total, from_cache=True)


def _components(components: Iterable[str] | None) -> frozenset[str]:
    wanted = ALL_COMPONENTS if components is None else frozenset(c.upper() for c in components)
    unknown = wanted - ALL_COMPONENTS
    if unknown:
        raise ValueError(f"unknown checkpoint components {sorted(unknown)} (use MODEL, CLIP, VAE)")
    return wanted


def load_checkpoint_file(
    path: str | os.PathLike[str],
    components: Iterable[str] | None = None,
    *,
    name: str | None = None,
    models_root: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
) -> LoadedCheckpoint:
    """Load the requested ``components`` (subset of ``{"MODEL", "CLIP", "VAE"}``, default all) of a single-file
    checkpoint or a diffusers folder. ``name`` is what the recipe records (default: the file name);
    ``models_root`` is where tokenizers and embeddings are looked for (default: found above ``checkpoints/``).

    Loads are cached in-process (the last two, keyed by path, mtime, size, components, device and dtypes); a
    request for fewer components than a cached load is served from it."""
    p = Path(path)
    wanted = _components(components)
    root = Path(models_root) if models_root is not None else models_root_of(p)
    name = name or p.name
    if not p.exists():
        raise ModelFileError(f"{_label(p)}: checkpoint not found")
    fkey = file_key(p)
    base_key = (fkey, str(device), str(dtype), str(vae_dtype), str(root), allow_pickle)
    if use_cache:
        entry = _CACHE.find(lambda key, entry: key[:-1] == base_key and wanted <= entry.components)
        if entry is not None:
            return _renamed(_subset(entry, wanted), name)
    loader = _load_diffusers_folder if p.is_dir() else _load_single_file
    loaded = loader(p, wanted, name=name, models_root=root, allow_pickle=allow_pickle, device=device, dtype=dtype,
                    vae_dtype=vae_dtype)
    if use_cache:
        _CACHE.put((*base_key, wanted), loaded)
        return _renamed(_subset(loaded, wanted), name, fresh=loaded)
    return loaded


def _renamed(entry: LoadedCheckpoint, name: str, fresh: LoadedCheckpoint | None = None) -> LoadedCheckpoint:
    recipe = Recipe("CheckpointLoaderSimple", name)
    for attr in ("model", "clip", "vae"):
        value = getattr(entry, attr)
        if value is not None and value.recipe != recipe:
            setattr(entry, attr, replace(value, recipe=recipe))
    if fresh is not None:
        entry.tensors_read = fresh.tensors_read
        entry.from_cache = False
    return entry


def vae_layout(keys: Iterable[str]) -> tuple[str, str]:
    """``("ldm" | "diffusers", prefix)`` of a stand-alone VAE file's keys."""
    keys = list(keys)
    for prefix in (layout.VAE_PREFIX, "vae.", ""):
        inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if any(k.startswith("encoder.down_blocks.") for k in inner):
            return "diffusers", prefix
        if any(k.startswith("encoder.down.") for k in inner):
            return "ldm", prefix
    raise ModelFileError("not a VAE (no encoder.down.* or encoder.down_blocks.* keys)")


_VAE_CACHE: ModelCache[VAEModel] = ModelCache(_CACHE_SIZE)


def load_vae_file(path: str | os.PathLike[str], *, name: str | None = None, family: str | None = None,
                  allow_pickle: bool = False, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, use_cache: bool = True) -> VAEModel:
    """A stand-alone VAE file (VAELoader): LDM keys (``encoder.down.*``, optionally ``first_stage_model.``) or
    diffusers keys (``encoder.down_blocks.*``). ``latent_scale`` comes from the embedded config, else ``family``
    (default sd1: 0.18215) — informational only: the sampler applies the MODEL's scale, as ComfyUI does."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    p = Path(path)
    label = _label(p)
    name = name or p.name
    key = (file_key(p), family, str(device), str(dtype), allow_pickle)
    cached = _VAE_CACHE.get(key) if use_cache else None
    if cached is not None:
        return replace(cached, recipe=Recipe("VAELoader", name))
    with TensorReader(p, allow_pickle=allow_pickle) as reader:
        try:
            kind, prefix = vae_layout(reader.keys)
        except ModelFileError as exc:
            raise ModelFileError(f"{label}: {exc}") from None
        embedded = embedded_config(reader.metadata) or {}
        fam = family or embedded.get("family") or "sd1"
        wanted = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        raw = reader.read(lambda k: k.startswith(prefix) and k[len(prefix):].startswith(wanted))
    raw = _strip(prefix, raw)
    if kind == "ldm":
        config = (embedded.get("configs") or {}).get("vae") or _vae_config(_shapes(raw), fam)
        weights = convert_ldm_vae_checkpoint(raw, config)
    else:
        weights = _rename_old_vae_attention(raw)
        config = (embedded.get("configs") or {}).get("vae") or _vae_config(_shapes(layout.vae_to_ldm(
            {k: v for k, v in weights.items()}, prefix="")), fam)
    module = build_vae(config, weights, label=label, device=device, dtype=dtype)
    vae = VAEModel(vae=module, latent_scale=float(config.get("scaling_factor", LATENT_SCALE.get(fam, 0.18215))),
                   recipe=Recipe("VAELoader", name))
    if use_cache:
        _VAE_CACHE.put(key, vae)
    return replace(vae)


# --- run-context entry points (what the node implementations call) ---------------------------------------------


def _ctx(context: Any) -> tuple[Path, bool, torch.device | str, torch.dtype, torch.dtype]:
    root = Path(context.models_root)
    allow_pickle = bool(getattr(context, "allow_pickle", False))
    device = getattr(context, "device", "cpu")
    dtype = getattr(context, "dtype", torch.float32) or torch.float32
    vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return root, allow_pickle, device, dtype, vae_dtype


def record_model_file(context: Any, folder: str, name: str, path: Path) -> None:
    """Add ``folder/name -> sha256`` to the run's snapshot (``context.model_files``), when it keeps one."""
    files = getattr(context, "model_files", None)
    if files is not None:
        files[f"{folder}/{name}"] = sha256_of(path)


def load_checkpoint(context: Any, ckpt_name: str | None = None,
                    components: Iterable[str] | None = None) -> LoadedCheckpoint:
    """CheckpointLoaderSimple for a run: ``ckpt_name`` in ``<models_root>/checkpoints``, on the run's device;
    UNet and text encoders in the run's dtype, the VAE in fp32 (bf16 when the run is bf16).

    ``load_checkpoint(path)`` (a path instead of a run context, no name) is :func:`load_checkpoint_file`."""
    if ckpt_name is None and isinstance(context, (str, os.PathLike)):
        return load_checkpoint_file(context, components)
    if ckpt_name is None:
        raise TypeError("load_checkpoint(context, ckpt_name, components) needs a checkpoint name")
    root, allow_pickle, device, dtype, vae_dtype = _ctx(context)
    path = resolve_model_file(root, "checkpoints", ckpt_name, allow_dir=True)
    record_model_file(context, "checkpoints", ckpt_name, path)
    return load_checkpoint_file(path, components, name=ckpt_name, models_root=root, allow_pickle=allow_pickle,
                                device=device, dtype=dtype, vae_dtype=vae_dtype)


def load_vae(context: Any, vae_name: str | None = None) -> VAEModel:
    """VAELoader for a run: ``vae_name`` in ``<models_root>/vae``. ``load_vae(path)`` is :func:`load_vae_file`."""
    if vae_name is None and isinstance(context, (str, os.PathLike)):
        return load_vae_file(context)
    if vae_name is None:
        raise TypeError("load_vae(context, vae_name) needs a VAE file name")
    root, allow_pickle, device, _, vae_dtype = _ctx(context)
    path = resolve_model_file(root, "vae", vae_name)
    record_model_file(context, "vae", vae_name, path)
    return load_vae_file(path, name=vae_name, allow_pickle=allow_pickle, device=device, dtype=vae_dtype)


def load_embedding_file(path: str | os.PathLike[str], *, width: int | None = None,
                        allow_pickle: bool = False) -> torch.Tensor:
    """A textual-inversion embedding ``[vectors, width]``: ``emb_params`` (safetensors), ``clip_l``/``clip_g``
    (SDXL; the one of ``width``), or A1111's ``string_to_param`` (pickle)."""
    p = Path(path)
    with TensorReader(p, allow_pickle=allow_pickle) as reader:
        sd = reader.read()
    candidates = [v for k, v in sd.items() if k in ("emb_params", "clip_l", "clip_g") or
                  k.startswith("string_to_param")] or list(sd.values())
    candidates = [c.reshape(-1, c.shape[-1]) for c in candidates if c.ndim in (1, 2, 3)]
    if width is not None:
        candidates = [c for c in candidates if c.shape[-1] == width]
    if not candidates:
        raise ModelFileError(f"{_label(p)}: no embedding vectors" + (f" of width {width}" if width else ""))
    return candidates[0].float()


def load_embedding(context: Any, name: str, *, width: int | None = None) -> torch.Tensor:
    """``embedding:name`` of a prompt: ``name`` (with or without extension) in ``<models_root>/embeddings``."""
    root, allow_pickle, *_ = _ctx(context)
    candidates = [name] if Path(name).suffix else [f"{name}{ext}" for ext in (".safetensors", ".pt", ".bin")]
    last: ModelFileError | None = None
    for candidate in candidates:
        try:
            path = resolve_model_file(root, "embeddings", candidate)
        except ModelFileError as exc:
            last = last or exc
            continue
        record_model_file(context, "embeddings", candidate, path)
        return load_embedding_file(path, width=width, allow_pickle=allow_pickle)
    assert last is not None
    raise last
