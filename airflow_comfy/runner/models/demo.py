"""Tiny random-weight demo models, written in seconds, in the layouts real model files use.

:func:`make_demo_models` fills a ComfyUI-style models folder:

* ``checkpoints/demo-sd15-tiny.safetensors``: an SD 1.x-shaped single-file checkpoint in LDM layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``): UNet with
  3×CrossAttnDown + 1×Down, channels (32, 32, 64, 64), 2 layers per block, 8 heads, cross-attention width 32;
  VAE with 4 blocks of 32 channels (8× down), scaling 0.18215; CLIP text model width 32, 2 layers, 4 heads,
  77 positions. Its diffusers configs are embedded in the safetensors ``__metadata__`` (key ``airflow_comfy``,
  see :mod:`.checkpoint`), although the loader would derive the same ones from the shapes.
* ``checkpoints/demo-sdxl-tiny.safetensors``: an SDXL-shaped single-file checkpoint in SGM layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.0.transformer.*`` = CLIP-L,
  ``conditioner.embedders.1.model.*`` = OpenCLIP-bigG): UNet Down + CrossAttnDown, channels (32, 64),
  1 layer per block, transformer depths (1, 2), linear projections, ``text_time`` added conditioning (time
  embedding 8, pooled width 48); cross-attention width 96 = CLIP-L's 32 + bigG's 64 (concatenated); bigG with
  a 48-wide ``text_projection`` (the pooled output); VAE like the SD 1.x one but scaling 0.13025. Configs
  embedded as for the SD 1.x one; both tokenizers are the demo tokenizer, in ``tokenizers/demo-sdxl-tiny/``
  (bigG pads with ``!``, as SDXL does). Built last, from seeds of its own.
* ``tokenizers/demo-sd15-tiny/``: its CLIP-layout BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json):
  the 256 byte characters in CLIP's order, the same with ``</w>``, 200 merges learned from a small built-in
  corpus, ``<|startoftext|>``, ``<|endoftext|>`` (714 tokens).
* ``vae/demo-vae.safetensors`` (stand-alone VAE, LDM keys, other weights than the checkpoint's),
  ``loras/demo-lora.safetensors`` (kohya layout, rank 4, alpha 2, UNet attention + text-encoder attention),
  ``controlnet/demo-controlnet.safetensors`` (a ControlNet of the tiny UNet, LDM ``control_model.*`` layout),
  ``upscale_models/demo-esrgan-x2.safetensors`` (tiny RRDB-Net ×2, original ESRGAN layout, initialised near a
  nearest-neighbour upscale so its output looks like the input), ``embeddings/demo-embedding.safetensors``
  (``emb_params`` ``[1, 32]``).

:func:`make_sd2_demo_models` (separately) writes two SD 2.x-shaped checkpoints in LDM layout, under names of the
caller's choice: a "768-v" one (marked v-prediction in its embedded config) and a 9-channel inpainting one
(eps). UNet Down + CrossAttnDown, channels (32, 64), 1 layer per block, linear projections, cross-attention
64 wide; OpenCLIP-layout text model at ``cond_stage_model.model.`` (width 64, 2 layers, GELU, 64-wide
``text_projection``); VAE as the SD 1.x one.

Everything is seeded: the same files (byte for byte) every time, with the same torch/diffusers/transformers.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.config import META_FORMAT, META_KEY
from airflow_comfy.runner.models.tokenizers import CLIP_BOS, CLIP_EOS, bytes_to_unicode, make_clip_tokenizer

DEMO_CHECKPOINT = "demo-sd15-tiny.safetensors"
DEMO_SDXL_CHECKPOINT = "demo-sdxl-tiny.safetensors"
DEMO_VAE = "demo-vae.safetensors"
DEMO_LORA = "demo-lora.safetensors"
DEMO_CONTROLNET = "demo-controlnet.safetensors"
DEMO_UPSCALER = "demo-esrgan-x2.safetensors"
DEMO_EMBEDDING = "demo-embedding.safetensors"
NUM_MERGES = 200
SEED = 20240601

TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}
TINY_VAE: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
TINY_CONTROLNET_EMBEDDING = [8, 8, 16, 16]
TINY_SDXL_CLIP_G_WIDTH = 64
TINY_SDXL_POOLED_WIDTH = 48
TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 32 + TINY_SDXL_CLIP_G_WIDTH,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TINY_SDXL_POOLED_WIDTH + 6 * 8,
    "norm_num_groups": 32,
}
TINY_SDXL_VAE: dict[str, Any] = dict(TINY_VAE, scaling_factor=0.13025)
DEMO_SD2_CHECKPOINT = "demo-sd2-tiny.safetensors"
DEMO_SD2_INPAINT_CHECKPOINT = "demo-sd2-inpaint-tiny.safetensors"
TINY_SD2_CLIP_WIDTH = 64
TINY_SD2_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4],
    "cross_attention_dim": TINY_SD2_CLIP_WIDTH,
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 32,
}

_CORPUS = """
a photo of a cat sitting on a chair in the sun
a photo of a dog running on the beach at sunset
beautiful scenery nature glass bottle landscape, purple galaxy bottle
masterpiece, best quality, a girl with long hair standing in a field of flowers
an astronaut riding a horse on the moon, highly detailed, digital art
a red apple on a wooden table, studio lighting, sharp focus
a castle on a mountain above the clouds, fantasy painting
a portrait of an old man with a beard, oil painting, dramatic light
a city street at night with neon lights and rain reflections
a small house in the forest, winter, snow, warm light in the windows
a bowl of fruit, still life, soft shadows, high resolution
a futuristic car driving through a desert, cinematic, wide angle
an underwater scene with colorful fish and coral reef
a cup of coffee on a table next to a book, morning light
a mountain lake with reflections of the trees, calm water, blue sky
text, watermark, blurry, low quality, worst quality, jpeg artifacts
embedding of a style, anime style, watercolor style, pencil sketch
a green dragon flying over a village, epic, detailed scales
a robot reading a newspaper in a park, photorealistic
two people walking along a river in autumn, golden leaves
a lighthouse on a rocky coast during a storm, waves crashing
a field of sunflowers under a bright summer sky
a close up of a flower with drops of water, macro photography
a train crossing a bridge in the mountains, morning fog
"""


# --- tokenizer -------------------------------------------------------------------------------------------------

_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


@lru_cache(maxsize=4)
def learn_bpe(corpus: str, num_merges: int = NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-layout vocabulary and ``num_merges`` BPE merges learned from ``corpus`` (deterministic: ties go to
    the lexicographically smallest pair)."""
    table = bytes_to_unicode()
    counts = Counter(_WORD.findall(corpus.lower()))
    words: dict[tuple[str, ...], int] = {}
    for word, n in counts.items():
        chars = [table[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        words[tuple(chars)] = words.get(tuple(chars), 0) + n
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        updated: dict[tuple[str, ...], int] = {}
        for symbols, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            updated[tuple(out)] = updated.get(tuple(out), 0) + n
        words = updated
    chars = list(table.values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def demo_tokenizer_files() -> dict[str, str]:
    """``{file name: text}`` of the demo tokenizer."""
    vocab, merges = learn_bpe(_CORPUS)
    vocab = dict(vocab)
    config = {
        "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS,
        "do_lower_case": True, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
    }
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=1) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True) + "\n",
    }


def demo_tokenizer() -> Any:
    vocab, merges = learn_bpe(_CORPUS)
    return make_clip_tokenizer(dict(vocab), list(merges))


def tiny_clip_config(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


# --- writing LDM files -----------------------------------------------------------------------------------------


def _metadata(family: str, configs: Mapping[str, Any], **extra: Any) -> dict[str, str]:
    payload = {"format": META_FORMAT, "family": family, "configs": dict(configs), **extra}
    return {META_KEY: json.dumps(payload, sort_keys=True, default=list)}


def _save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    tmp = path.with_name(path.name + ".tmp")
    save_file(data, str(tmp), metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
    return path


def _config_of(module: torch.nn.Module) -> dict[str, Any]:
    config = module.config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps({k: v for k, v in data.items() if not k.startswith("_")}, default=list))


_CLIP_KEEP = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
              "pad_token_id", "projection_dim")


def save_ldm_checkpoint(path: str | os.PathLike[str], *, unet: torch.nn.Module | None = None,
                        vae: torch.nn.Module | None = None, text_encoders: Iterable[torch.nn.Module] = (),
                        family: str = "sd1", embed_config: bool = True, prediction: str | None = None,
                        extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write diffusers/transformers modules as one ComfyUI-style single-file checkpoint (LDM layout).

    ``family="sd1"``: one CLIP text model at ``cond_stage_model.transformer.``; ``"sd2"``: a
    CLIPTextModelWithProjection at ``cond_stage_model.model.`` (OpenCLIP layout); ``"sdxl"``: CLIP-L at
    ``conditioner.embedders.0.transformer.`` and a CLIPTextModelWithProjection at ``conditioner.embedders.1.model.``
    (OpenCLIP layout); ``"sdxl_refiner"``: the latter alone at ``conditioner.embedders.0.model.``.
    ``embed_config`` stores the modules' configs (and ``prediction``, when given) in ``__metadata__``;
    ``extra_tensors`` are written as they are (e.g. ``model_ema.*``)."""
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {}
    if unet is not None:
        tensors.update(layout.unet_to_ldm(unet.state_dict()))
        configs["unet"] = _config_of(unet)
    if vae is not None:
        tensors.update(layout.vae_to_ldm(vae.state_dict()))
        configs["vae"] = _config_of(vae)
    encoders = list(text_encoders)
    for index, model in enumerate(encoders):
        state = model.state_dict()
        clip_config = {k: v for k, v in _config_of(model).items() if k in _CLIP_KEEP}
        if family == "sd1":
            tensors.update(layout.clip_to_ldm(state, layout.SD1_CLIP_PREFIX))
            configs["text_encoder"] = clip_config
        elif family == "sd2":
            tensors.update(layout.open_clip_to_ldm(state, layout.SD2_CLIP_PREFIX))
            configs["text_encoder"] = clip_config
        elif family == "sdxl_refiner":
            tensors.update(layout.open_clip_to_ldm(state, layout.REFINER_CLIP_G_PREFIX))
            configs["text_encoder_2"] = clip_config
        elif family == "sdxl" and index == 0:
            tensors.update(layout.clip_to_ldm(state, layout.SDXL_CLIP_L_PREFIX))
            configs["text_encoder"] = clip_config
        elif family == "sdxl":
            tensors.update(layout.open_clip_to_ldm(state, layout.SDXL_CLIP_G_PREFIX))
            configs["text_encoder_2"] = clip_config
        else:
            raise ValueError(f"cannot write text encoders of family {family!r}")
    tensors.update(extra_tensors or {})
    extra = {"prediction": prediction} if prediction else {}
    return _save(Path(path), tensors, _metadata(family, configs, **extra) if embed_config else None)


def save_ldm_vae(path: str | os.PathLike[str], vae: torch.nn.Module, *, family: str = "sd1") -> Path:
    """A stand-alone VAE file in LDM layout (``encoder.*``, ``decoder.*`` ... without a prefix)."""
    return _save(Path(path), layout.vae_to_ldm(vae.state_dict(), prefix=""),
                 _metadata(family, {"vae": _config_of(vae)}))


def save_ldm_controlnet(path: str | os.PathLike[str], controlnet: torch.nn.Module, *, family: str = "sd1") -> Path:
    """A ControlNet in LDM layout (``control_model.*``)."""
    return _save(Path(path), layout.unet_to_ldm(controlnet.state_dict(), prefix=layout.CONTROLNET_PREFIX),
                 _metadata(family, {"controlnet": _config_of(controlnet)}))


# --- the tiny models -------------------------------------------------------------------------------------------


def build_tiny_sd15(seed: int = SEED) -> dict[str, Any]:
    """The demo checkpoint's modules (``unet``, ``vae``, ``text_encoder``) and ``tokenizer``, in memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = demo_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(TINY_VAE)
    torch.manual_seed(seed + 2)
    text = CLIPTextModel(CLIPTextConfig(**tiny_clip_config(len(tokenizer)), attn_implementation="eager"))
    for module in (unet, vae, text):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tokenizer}


def build_tiny_sdxl(seed: int = SEED + 10) -> dict[str, Any]:
    """The SDXL demo checkpoint's modules (``unet``, ``vae``, ``text_encoder`` = CLIP-L, ``text_encoder_2`` =
    bigG with projection) and ``tokenizer`` (the demo tokenizer, for both encoders), in memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = demo_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(TINY_SDXL_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(TINY_SDXL_VAE)
    torch.manual_seed(seed + 2)
    clip_l = CLIPTextModel(CLIPTextConfig(**tiny_clip_config(vocab), attn_implementation="eager"))
    torch.manual_seed(seed + 3)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        **dict(tiny_clip_config(vocab), hidden_size=TINY_SDXL_CLIP_G_WIDTH, intermediate_size=128, hidden_act="gelu",
               projection_dim=TINY_SDXL_POOLED_WIDTH), attn_implementation="eager"))
    for module in (unet, vae, clip_l, clip_g):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g, "tokenizer": tokenizer}


def tiny_sd2_clip_config(vocab_size: int) -> dict[str, Any]:
    """A 64-wide, 2-layer OpenCLIP-style text model (GELU, square projection, as ViT-H's 1024 -> 1024)."""
    return dict(tiny_clip_config(vocab_size), hidden_size=TINY_SD2_CLIP_WIDTH, intermediate_size=4 * TINY_SD2_CLIP_WIDTH,
                hidden_act="gelu", projection_dim=TINY_SD2_CLIP_WIDTH)


def build_tiny_sd2(seed: int = SEED + 20, *, inpaint: bool = False) -> dict[str, Any]:
    """An SD 2.x-shaped model (``unet`` with linear projections and 64-wide cross-attention, 9 input channels
    when ``inpaint``; ``vae`` as SD 1.x's; ``text_encoder`` a CLIPTextModelWithProjection in OpenCLIP's
    shape) and ``tokenizer`` (the demo tokenizer), in memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = demo_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(dict(TINY_SD2_UNET, in_channels=9 if inpaint else 4))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(TINY_VAE)
    torch.manual_seed(seed + 2)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_sd2_clip_config(len(tokenizer)),
                                                      attn_implementation="eager"))
    for module in (unet, vae, text):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tokenizer}


def make_sd2_demo_models(folder: str | os.PathLike[str], *, checkpoint: str = DEMO_SD2_CHECKPOINT,
                         inpaint_checkpoint: str = DEMO_SD2_INPAINT_CHECKPOINT) -> list[Path]:
    """Two SD 2.x-shaped checkpoints under ``folder/checkpoints`` (not part of :func:`make_demo_models`):
    ``checkpoint``, marked v-prediction like the 768-v models, and ``inpaint_checkpoint``, a 9-channel
    inpainting UNet (eps, like the 512 inpainting model); each with the demo tokenizer in
    ``tokenizers/<stem>/``. The names can be those of the real files a workflow asks for."""
    root = Path(folder)
    written: list[Path] = []
    for name, inpaint in ((checkpoint, False), (inpaint_checkpoint, True)):
        parts = build_tiny_sd2(SEED + 20 + 10 * inpaint, inpaint=inpaint)
        tok_dir = root / "tokenizers" / Path(name).stem
        tok_dir.mkdir(parents=True, exist_ok=True)
        for file_name, text in demo_tokenizer_files().items():
            (tok_dir / file_name).write_text(text, encoding="utf-8")
            written.append(tok_dir / file_name)
        written.append(save_ldm_checkpoint(root / "checkpoints" / name, unet=parts["unet"], vae=parts["vae"],
                                           text_encoders=[parts["text_encoder"]], family="sd2",
                                           prediction="eps" if inpaint else "v"))
    return written


def build_tiny_controlnet(unet: torch.nn.Module, seed: int = SEED + 3) -> torch.nn.Module:
    """A ControlNet of ``unet`` whose zero convolutions are made non-zero (so it changes the result)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_CONTROLNET_EMBEDDING)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return controlnet.eval().requires_grad_(False)


def tiny_lora_state_dict(unet: torch.nn.Module, text_encoder: torch.nn.Module, *, rank: int = 4, alpha: float = 2.0,
                         seed: int = SEED + 4) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA for the attention projections of ``unet`` and ``text_encoder`` (non-zero up weights)."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def add(prefix: str, name: str, weight: torch.Tensor) -> None:
        base = prefix + name.replace(".", "_")
        out_features, in_features = weight.shape[0], weight[0].numel()
        out[f"{base}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        out[f"{base}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        out[f"{base}.alpha"] = torch.tensor(float(alpha))

    for name, module in unet.named_modules():
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            add("lora_unet_", name, module.weight)
    for name, module in text_encoder.named_modules():
        if re.search(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$", name):
            full = name if name.startswith("text_model.") else "text_model." + name
            add("lora_te_", full, module.weight)
    return out


def tiny_esrgan_state_dict(*, nf: int = 8, nb: int = 1, gc: int = 8, seed: int = SEED + 5) -> dict[str, torch.Tensor]:
    """A ×2 RRDB-Net in the original ESRGAN layout, close to a nearest-neighbour upscale plus small noise."""
    from airflow_comfy.runner.models.esrgan import RRDBNet

    generator = torch.Generator().manual_seed(seed)
    net = RRDBNet(in_nc=3, out_nc=3, nf=nf, nb=nb, gc=gc, upsamples=1)
    sd = {}
    for name, value in net.state_dict().items():
        if name.endswith(".bias"):
            sd[name] = torch.zeros(value.shape)
        else:
            sd[name] = torch.randn(value.shape, generator=generator) * 0.01
    for name in ("conv_first", "conv_up1", "conv_hr", "conv_last"):
        weight = sd[f"{name}.weight"]
        for c in range(3):
            weight[c, c, 1, 1] += 1.0
    mapping = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}", "conv_up1": "model.3",
               "conv_hr": "model.5", "conv_last": "model.7"}
    out = {}
    for name, value in sd.items():
        module, _, param = name.rpartition(".")
        if m := re.match(r"body\.(\d+)\.rdb(\d)\.conv(\d)$", module):
            out[f"model.1.sub.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.0.{param}"] = value
        else:
            out[f"{mapping[module]}.{param}"] = value
    return out


def make_demo_models(folder: str | os.PathLike[str]) -> list[Path]:
    """Write the demo models (see the module docstring) under ``folder``; returns the files written."""
    from diffusers import AutoencoderKL

    root = Path(folder)
    written: list[Path] = []
    parts = build_tiny_sd15()
    stem = Path(DEMO_CHECKPOINT).stem
    tok_dir = root / "tokenizers" / stem
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name, text in demo_tokenizer_files().items():
        (tok_dir / name).write_text(text, encoding="utf-8")
        written.append(tok_dir / name)
    written.append(save_ldm_checkpoint(root / "checkpoints" / DEMO_CHECKPOINT, unet=parts["unet"], vae=parts["vae"],
                                       text_encoders=[parts["text_encoder"]], family="sd1"))
    torch.manual_seed(SEED + 6)
    other_vae = AutoencoderKL.from_config(TINY_VAE).eval()
    written.append(save_ldm_vae(root / "vae" / DEMO_VAE, other_vae))
    # (one metadata entry at most: safetensors writes several in an unpredictable order)
    written.append(_save(root / "loras" / DEMO_LORA, tiny_lora_state_dict(parts["unet"], parts["text_encoder"]),
                         {"ss_network_module": "networks.lora"}))
    written.append(save_ldm_controlnet(root / "controlnet" / DEMO_CONTROLNET, build_tiny_controlnet(parts["unet"])))
    written.append(_save(root / "upscale_models" / DEMO_UPSCALER, tiny_esrgan_state_dict()))
    generator = torch.Generator().manual_seed(SEED + 7)
    written.append(_save(root / "embeddings" / DEMO_EMBEDDING,
                         {"emb_params": torch.randn(1, 32, generator=generator) * 0.02}))
    # (last, with seeds of its own, so that the files above do not depend on it)
    xl = build_tiny_sdxl()
    xl_tok_dir = root / "tokenizers" / Path(DEMO_SDXL_CHECKPOINT).stem
    xl_tok_dir.mkdir(parents=True, exist_ok=True)
    for name, text in demo_tokenizer_files().items():
        (xl_tok_dir / name).write_text(text, encoding="utf-8")
        written.append(xl_tok_dir / name)
    written.append(save_ldm_checkpoint(root / "checkpoints" / DEMO_SDXL_CHECKPOINT, unet=xl["unet"], vae=xl["vae"],
                                       text_encoders=[xl["text_encoder"], xl["text_encoder_2"]], family="sdxl"))
    return written


def write_demo_inputs(folder: str | os.PathLike[str]) -> list[Path]:
    """The input images the example workflows read: ``demo-input.png`` (an RGB 64×64 gradient with a dark square
    and a light disc on it, so that Canny finds edges) and ``demo-mask.png`` (a white disc on black, 64×64)."""
    import numpy as np
    from PIL import Image, ImageDraw

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:64]
    gradient = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(gradient, "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 34, 26, 56), fill=(20, 30, 40))
    draw.ellipse((34, 6, 58, 30), fill=(240, 230, 200))
    image.save(root / "demo-input.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 47, 47), fill=255)
    mask.save(root / "demo-mask.png")
    return [root / "demo-input.png", root / "demo-mask.png"]
