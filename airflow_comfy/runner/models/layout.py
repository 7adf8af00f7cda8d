"""Key layouts: diffusers/transformers module names <-> the original-SD ("LDM") names of single-file checkpoints,
and diffusers configs derived from tensor shapes.

diffusers ships the LDM -> diffusers direction (``diffusers.loaders.single_file_utils``); the loaders use it.
This module writes the other direction (our own code): it is what the demo-model writer uses to produce
ComfyUI-style single files, and what the LoRA loader uses to recognise LDM-named LoRA keys. Every mapping here
is the exact inverse of diffusers' converter, so diffusers -> LDM -> diffusers is bit-exact.

The key maps are derived from the key names alone (``layers_per_block`` is counted from the keys), so they need
no config. The config derivations read shapes only (no tensor data), from the LDM names without their prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_PREFIX = "control_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_CLIP_PREFIX = "cond_stage_model.model."
SD2_SGM_CLIP_PREFIX = "conditioner.embedders.0.model."
"""SD 2.x's OpenCLIP ViT-H in the SGM (SDXL-style) layout; the SDXL refiner keeps its bigG at the same place."""
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _count(keys: Iterable[str], pattern: str) -> int:
    """How many distinct values the ``(\\d+)`` group of ``pattern`` takes over ``keys``."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return (max(found) + 1) if found else 0


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM.get(head, head)}.{tail}" if tail else _RESNET_TO_LDM.get(head, head)


def unet_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel (or ControlNetModel) parameter names -> LDM names (no prefix).

    Also maps ControlNet-only keys (``controlnet_*``); keys it does not know are left out."""
    keys = list(keys)
    lpb = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_with_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    n_hint_blocks = _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    out: dict[str, str] = {}
    for key in keys:
        module, param = _split_param(key)
        ldm: str | None = None
        if module in _UNET_TOP_TO_LDM:
            ldm = _UNET_TOP_TO_LDM[module]
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4) or ""
            index = 1 + b * (lpb + 1) + j
            if kind == "resnets":
                ldm = f"input_blocks.{index}.0.{_resnet_rest(rest)}"
            else:
                ldm = f"input_blocks.{index}.1" + (f".{rest}" if rest else "")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            ldm = f"input_blocks.{1 + int(m.group(1)) * (lpb + 1) + lpb}.0.op"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
            if kind == "resnets":
                ldm = f"middle_block.{2 * j}.{_resnet_rest(rest)}"
            else:
                ldm = "middle_block.1" + (f".{rest}" if rest else "")
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4) or ""
            index = b * (lpb + 1) + j
            if kind == "resnets":
                ldm = f"output_blocks.{index}.0.{_resnet_rest(rest)}"
            else:
                ldm = f"output_blocks.{index}.1" + (f".{rest}" if rest else "")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            b = int(m.group(1))
            ldm = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in up_with_attn else 1}.conv"
        elif module == "controlnet_cond_embedding.conv_in":
            ldm = "input_hint_block.0"
        elif module == "controlnet_cond_embedding.conv_out":
            ldm = f"input_hint_block.{2 * (n_hint_blocks + 1)}"
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)$", module):
            ldm = f"input_hint_block.{2 * (int(m.group(1)) + 1)}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)$", module):
            ldm = f"zero_convs.{m.group(1)}.0"
        elif module == "controlnet_mid_block":
            ldm = "middle_block_out.0"
        if ldm is not None:
            out[key] = f"{ldm}.{param}"
    return out


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers AutoencoderKL parameter names -> LDM names (no prefix)."""
    keys = list(keys)
    n_up = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, str] = {}
    for key in keys:
        module, param = _split_param(key)
        ldm: str | None = None
        if module in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                      "decoder.conv_in", "decoder.conv_out"):
            ldm = module
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out$", module):
            ldm = f"{m.group(1)}.norm_out"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", module):
            ldm = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            ldm = f"encoder.down.{m.group(1)}.downsample.conv"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", module):
            ldm = (f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}."
                   f"{m.group(3).replace('conv_shortcut', 'nin_shortcut')}")
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            ldm = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", module):
            ldm = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$", module):
            ldm = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN_TO_LDM.get(m.group(2), m.group(2))}"
        if ldm is not None:
            out[key] = f"{ldm}.{param}"
    return out


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers UNet (or ControlNet) state dict in LDM layout, with ``prefix``."""
    mapping = unet_key_map(state_dict)
    missing = sorted(set(state_dict) - set(mapping))
    if missing:
        raise ValueError(f"no LDM name for {len(missing)} UNet keys, e.g. {missing[:3]}")
    return {prefix + mapping[k]: v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM layout (attention projections as 1x1 convs)."""
    mapping = vae_key_map(state_dict)
    missing = sorted(set(state_dict) - set(mapping))
    if missing:
        raise ValueError(f"no LDM name for {len(missing)} VAE keys, e.g. {missing[:3]}")
    out = {}
    for key, value in state_dict.items():
        ldm = mapping[key]
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[prefix + ldm] = value
    return out


def hf_clip_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-model keys in the classic ``text_model.*`` naming (transformers 5's CLIPTextModel drops the
    ``text_model.`` level; CLIPTextModelWithProjection keeps it)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("text_model.", "text_projection.")) or key == "logit_scale":
            out[key] = value
        else:
            out["text_model." + key] = value
    return out


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = SD1_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict as stored in SD checkpoints (``prefix`` + ``text_model.*``)."""
    return {prefix + k: v for k, v in hf_clip_keys(state_dict).items() if not k.endswith("position_ids")}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = SDXL_CLIP_G_PREFIX
                     ) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP layout (SDXL's second text encoder)."""
    sd = hf_clip_keys(state_dict)
    out: dict[str, torch.Tensor] = {}
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, name in simple.items():
        out[prefix + name] = sd[key]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    n_layers = _count(sd, r"text_model\.encoder\.layers\.(\d+)\.")
    for i in range(n_layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    return out


_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_BLOCK = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def open_clip_from_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = SD2_CLIP_PREFIX
                       ) -> dict[str, torch.Tensor]:
    """An OpenCLIP text transformer as stored in SD 2.x / SDXL checkpoints (``prefix`` + ``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.N.{attn.in_proj_*, attn.out_proj, ln_1, ln_2, mlp.c_fc,
    mlp.c_proj}``, ``ln_final``, ``text_projection``) -> transformers ``CLIPTextModelWithProjection`` keys
    (``text_model.*``, ``text_projection.weight``): the packed ``in_proj`` split into equal q/k/v thirds, the
    ``x @ P`` projection transposed into a Linear weight. Every layer is kept (diffusers' own converter drops
    SD 2.x's last layer, which ComfyUI keeps for the pooled output). Other keys (``logit_scale``) are left out."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out = {hf: sd[ldm] for ldm, hf in _OPEN_CLIP_TOP.items() if ldm in sd}
    if "text_projection" in sd:
        out["text_projection.weight"] = sd["text_projection"].T.contiguous()
    for key, value in sd.items():
        if m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            layer, kind = m.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.contiguous()
        elif (m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)) \
                and m.group(2) in _OPEN_CLIP_BLOCK:
            layer, module, kind = m.groups()
            out[f"text_model.encoder.layers.{layer}.{_OPEN_CLIP_BLOCK[module]}.{kind}"] = value
    return out


# --- configs from shapes -----------------------------------------------------------------------------------


def _heads_for(channels: int) -> int:
    """Attention heads when the file does not say: SD's 64-wide heads, or 8-wide ones for tiny models."""
    if channels >= 64 and channels % 64 == 0:
        return channels // 64
    return max(1, channels // 8)


def unet_config_from_ldm(shapes: Shapes, *, family: str = "sd1") -> dict:
    """The diffusers UNet2DConditionModel config of an LDM UNet (keys without ``model.diffusion_model.``).

    What shapes cannot tell: attention heads (SD 1.x: 8 per block; otherwise 64-wide heads) and, for SDXL,
    the size-embedding width (256); the caller overlays a shipped or embedded config for those."""
    levels = _unet_levels(shapes)
    if not levels:
        raise ValueError("no UNet input blocks found")
    lpb = levels[0]["resnets"]
    channels = [lv["channels"] for lv in levels]
    depths = [max(lv["depths"]) if lv["depths"] else 0 for lv in levels]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)]
    layers = [d or 1 for d in depths]
    cross = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    linear = any(len(s) == 2 for k, s in shapes.items() if k.endswith("proj_in.weight"))
    conv_in = shapes["input_blocks.0.0.weight"]
    config: dict = {
        "in_channels": conv_in[1],
        "out_channels": shapes["out.2.weight"][0] if "out.2.weight" in shapes else conv_in[1],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": cross,
        "use_linear_projection": linear,
        "transformer_layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "attention_head_dim": 8 if family == "sd1" else [_heads_for(c) for c in channels],
        "norm_num_groups": 32,
    }
    if not any(k.startswith("middle_block.1.transformer_blocks.") for k in shapes):
        config["mid_block_type"] = "UNetMidBlock2D"
    if "label_emb.0.0.weight" in shapes:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1])
    return config


def _unet_levels(shapes: Shapes) -> list[dict]:
    n_input = _count(shapes, r"input_blocks\.(\d+)\.")
    levels: list[dict] = []
    current: dict = {"resnets": 0, "channels": None, "depths": []}
    for k in range(1, n_input):
        if f"input_blocks.{k}.0.op.weight" in shapes:
            levels.append(current)
            current = {"resnets": 0, "channels": None, "depths": []}
            continue
        out = shapes.get(f"input_blocks.{k}.0.out_layers.3.weight")
        if out is None:
            continue
        current["resnets"] += 1
        current["channels"] = out[0]
        current["depths"].append(_count(shapes, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\."))
    if current["resnets"]:
        levels.append(current)
    return levels


def controlnet_config_from_ldm(shapes: Shapes, *, family: str = "sd1") -> dict:
    """The diffusers ControlNetModel config of an LDM ControlNet (keys without ``control_model.``)."""
    unet = unet_config_from_ldm(shapes, family=family)
    hint = sorted(int(m.group(1)) for k in shapes if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k)))
    # input_hint_block: conv_in (0), then pairs (c_i -> c_i, c_i -> c_{i+1} stride 2), then conv_out (last).
    blocks = hint[1:-1]
    embedding = [shapes["input_hint_block.0.weight"][0]]
    embedding += [shapes[f"input_hint_block.{b}.weight"][0] for b in blocks[1::2]]
    config = {k: unet[k] for k in ("in_channels", "down_block_types", "block_out_channels", "layers_per_block",
                                   "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block",
                                   "attention_head_dim", "norm_num_groups")}
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "mid_block_type"):
        if key in unet:
            config[key] = unet[key]
    config["conditioning_channels"] = shapes["input_hint_block.0.weight"][1]
    config["conditioning_embedding_out_channels"] = embedding
    return config


def vae_config_from_ldm(shapes: Shapes) -> dict:
    """The diffusers AutoencoderKL config of an LDM VAE (keys without ``first_stage_model.``)."""
    n = _count(shapes, r"encoder\.down\.(\d+)\.")
    if not n:
        raise ValueError("no VAE encoder blocks found")
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(n)]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": _count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        "norm_num_groups": 32,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


def clip_config_from_hf(shapes: Shapes, *, hidden_act: str = "quick_gelu") -> dict:
    """A transformers CLIPTextConfig (as a dict) from ``text_model.*`` shapes."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": _heads_for(hidden),
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
    }
    if "text_projection.weight" in shapes:
        config["projection_dim"] = shapes["text_projection.weight"][0]
    return config
