"""SD 2.x: family and variant detection at the real key layouts (full-size shapes on the meta device), the OpenCLIP
ViT-H conversion against a plain-torch forward written from the architecture, ComfyUI's SD 2.x conditioning
(penultimate layer through the final LayerNorm, pad id 0, projected pooled output) and v-prediction detection.

Architecture facts the reference forward is written from (OpenCLIP's text transformer, as SD 2.x stores it):
``x = token_embedding[ids] + positional_embedding``; per resblock ``x += out_proj(MHA(ln_1(x)))`` with the causal
mask, q/k/v the three equal row blocks of ``in_proj``, ``softmax(q·kᵀ/√d_head)``, then ``x += c_proj(gelu(c_fc(
ln_2(x))))`` with exact (erf) GELU; LayerNorm eps 1e-5; ``ln_final`` at the end; the pooled output is
``ln_final(x)[EOS] @ text_projection``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from airflow_comfy.runner.models import ModelFileError, demo, layout, load_checkpoint_file, shipped_config
from airflow_comfy.runner.models.config import _clip_config, _unet_config, _vae_config
from airflow_comfy.runner.models.diffusers_folder import _mark_dropped_layers
from airflow_comfy.runner.models.families import V_PROBE, detect_family, detect_prediction
from airflow_comfy.runner.text import DROPPED_LAYERS_ATTR, encode_prompt, encoder_settings, tokenize_weighted
from airflow_comfy.runner.values import Recipe, TextEncoder

Shapes = dict[str, tuple[int, ...]]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- full-size key layouts on the meta device --------------------------------------------------------------------


def _unet_shapes(config: dict) -> Shapes:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {k: tuple(v.shape) for k, v in layout.unet_to_ldm(unet.state_dict()).items()}


def _text_shapes(config: dict, prefix: str) -> Shapes:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        if prefix.endswith(".model."):
            state = layout.open_clip_to_ldm(CLIPTextModelWithProjection(cfg).state_dict(), prefix)
        else:
            state = layout.clip_to_ldm(CLIPTextModel(cfg).state_dict(), prefix)
    return {k: tuple(v.shape) for k, v in state.items()}


def _vae_shapes() -> Shapes:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(shipped_config("sd2", "vae"))
    return {k: tuple(v.shape) for k, v in layout.vae_to_ldm(vae.state_dict()).items()}


@cache
def _sd2_shapes() -> Shapes:
    """A real-size SD 2.x checkpoint's key layout: UNet, VAE, OpenCLIP ViT-H (``cond_stage_model.model.``)."""
    return {**_unet_shapes(shipped_config("sd2", "unet")), **_vae_shapes(),
            **_text_shapes(shipped_config("sd2", "text_encoder"), layout.SD2_CLIP_PREFIX)}


@cache
def _sd1_shapes() -> Shapes:
    return {**_unet_shapes(shipped_config("sd1", "unet")), **_vae_shapes(),
            **_text_shapes(shipped_config("sd1", "text_encoder"), layout.SD1_CLIP_PREFIX)}


@cache
def _refiner_shapes() -> Shapes:
    """SDXL refiner 1.0: 384-channel UNet, transformer depth 4, 1280-wide cross-attention, 2560-wide ADM; bigG
    alone at ``conditioner.embedders.0.model.``."""
    unet = {
        "in_channels": 4, "out_channels": 4, "block_out_channels": [384, 768, 1536, 1536], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 4, "attention_head_dim": [6, 12, 24, 24], "cross_attention_dim": 1280,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560,
    }
    return {**_unet_shapes(unet), **_vae_shapes(),
            **_text_shapes(shipped_config("sdxl", "text_encoder_2"), layout.REFINER_CLIP_G_PREFIX)}


def _with(shapes: Shapes, **changes: tuple[int, ...]) -> Shapes:
    out = dict(shapes)
    for key, value in changes.items():
        out[layout.UNET_PREFIX + key.replace("__", ".")] = value
    return out


def _renamed(shapes: Shapes, old: str, new: str) -> Shapes:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in shapes.items()}


def _detect(shapes: Shapes, label: str = "checkpoints/x.safetensors") -> str:
    return detect_family(list(shapes), shapes.__getitem__, label=label)


def test_shipped_sd2_configs_agree_with_shape_derivation():
    """Real-size SD 2.x modules on the meta device -> LDM key layout -> configs derived from the shapes."""
    from diffusers import UNet2DConditionModel

    shapes = _sd2_shapes()
    unet = {k[len(layout.UNET_PREFIX):]: v for k, v in shapes.items() if k.startswith(layout.UNET_PREFIX)}
    shipped = {k: v for k, v in shipped_config("sd2", "unet").items() if not k.startswith("_")}
    derived = _unet_config(unet, "sd2")
    assert {k: derived[k] for k in shipped} == shipped
    assert derived["attention_head_dim"] == [5, 10, 20, 20] and derived["upcast_attention"] is True
    with torch.device("meta"):
        assert UNet2DConditionModel.from_config(derived).config.cross_attention_dim == 1024
    vae = {k[len(layout.VAE_PREFIX):]: v for k, v in shapes.items() if k.startswith(layout.VAE_PREFIX)}
    assert _vae_config(vae, "sd2")["scaling_factor"] == pytest.approx(0.18215)
    with torch.device("meta"):
        text = layout.open_clip_from_ldm({k: torch.empty(v) for k, v in shapes.items()
                                          if k.startswith(layout.SD2_CLIP_PREFIX)})
    clip = _clip_config({k: tuple(v.shape) for k, v in text.items()}, "sd2", "text_encoder")
    expected = {k: v for k, v in shipped_config("sd2", "text_encoder").items()
                if k not in ("architectures", "model_type")}
    assert clip == expected
    assert (clip["hidden_size"], clip["num_hidden_layers"], clip["num_attention_heads"], clip["hidden_act"]) == (
        1024, 24, 16, "gelu")


def test_sd2_detected_in_both_layouts_and_as_inpainting():
    shapes = _sd2_shapes()
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight") for k in shapes)
    assert _detect(shapes) == "sd2"
    assert _detect(_renamed(shapes, layout.SD2_CLIP_PREFIX, layout.SD2_SGM_CLIP_PREFIX)) == "sd2"
    assert _detect(_with(shapes, input_blocks__0__0__weight=(320, 9, 3, 3))) == "sd2"
    unet_only = {k: v for k, v in shapes.items() if k.startswith(layout.UNET_PREFIX)}
    assert _detect(unet_only) == "sd2"
    assert _detect(_sd1_shapes()) == "sd1"
    assert _detect({k: v for k, v in _sd1_shapes().items() if k.startswith(layout.UNET_PREFIX)}) == "sd1"
    assert detect_family(["cond_stage_model.model.ln_final.weight"]) == "sd2"  # key names alone


def test_sdxl_refiner_detected_at_its_real_layout():
    shapes = _refiner_shapes()
    assert shapes[layout.UNET_PREFIX + "label_emb.0.0.weight"] == (1536, 2560)
    assert _detect(shapes) == "sdxl_refiner"
    text_only = {k: v for k, v in shapes.items() if k.startswith(layout.REFINER_CLIP_G_PREFIX)}
    assert _detect(text_only) == "sdxl_refiner"  # 1280 wide: bigG, not SD 2.x's ViT-H


@pytest.mark.parametrize(("case", "what"), [
    ("unclip", "SD 2.1 unCLIP"),
    ("depth", "SD 2.x depth-conditioned"),
    ("upscaler", "x4 upscaler"),
    ("pix2pix", "SD 1.x instruct-pix2pix"),
    ("mixed", "SD 1.x text encoder with an SD 2.x UNet"),
    ("bare", "bare UNet"),
    ("diffusers_unet", "diffusers-layout UNet"),
    ("flux", "Flux"),
    ("sd3", "SD3"),
])
def test_unsupported_variants_are_refused_in_one_sentence(case: str, what: str):
    sd2, sd1 = _sd2_shapes(), _sd1_shapes()
    shapes = {
        "unclip": lambda: _with(sd2, label_emb__0__0__weight=(1280, 2048), label_emb__0__2__weight=(1280, 1280)),
        "depth": lambda: _with(sd2, input_blocks__0__0__weight=(320, 5, 3, 3)),
        "upscaler": lambda: _with(sd2, input_blocks__0__0__weight=(320, 7, 3, 3)),
        "pix2pix": lambda: _with(sd1, input_blocks__0__0__weight=(320, 8, 3, 3)),
        "mixed": lambda: {**{k: v for k, v in sd2.items() if not k.startswith("cond_stage_model.")},
                          **{k: v for k, v in sd1.items() if k.startswith("cond_stage_model.")}},
        "bare": lambda: {k[len(layout.UNET_PREFIX):]: v for k, v in sd2.items() if k.startswith(layout.UNET_PREFIX)},
        "diffusers_unet": lambda: {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (1,)},
        "flux": lambda: {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,)},
        "sd3": lambda: {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536)},
    }[case]()
    with pytest.raises(ModelFileError) as info:
        _detect(shapes, label="checkpoints/odd.safetensors")
    message = str(info.value)
    assert message.startswith("checkpoints/odd.safetensors looks like ")
    assert what in message
    assert "supported: SD 1.x, SD 2.x" in message and "SDXL base/refiner" in message
    assert not re.search(r"\.\s+[A-Z]", message), "one sentence"


# --- v-prediction ------------------------------------------------------------------------------------------------


def test_v_prediction_decided_as_comfyui_does():
    spread = {V_PROBE: torch.randn(320, generator=torch.Generator().manual_seed(0)) * 0.2}
    flat = {V_PROBE: torch.randn(320, generator=torch.Generator().manual_seed(0)) * 0.05}
    assert detect_prediction("sd2", spread, in_channels=4) == "v"
    assert detect_prediction("sd2", flat, in_channels=4) == "eps"
    assert detect_prediction("sd2", spread, in_channels=9) == "eps"  # SD 2 inpainting models are eps
    assert detect_prediction("sd1", spread, in_channels=4) == "eps"
    assert detect_prediction("sd2", {}, in_channels=4) == "eps"
    assert detect_prediction("sdxl", {}, in_channels=4, v_pred_key=True) == "v"
    assert detect_prediction("sd2", spread, in_channels=4, embedded="eps") == "eps"
    # the population standard deviation (of [0, 0.2]: 0.1 > 0.09; the sample one would be 0.141)
    assert detect_prediction("sd2", {V_PROBE: torch.tensor([0.0, 0.2])}, in_channels=4) == "v"
    assert detect_prediction("sd2", {V_PROBE: torch.tensor([0.0, 0.16])}, in_channels=4) == "eps"


def _tiny_four_level_sd2(in_channels: int, probe_std: float) -> dict:
    """An SD 2.x-shaped UNet with SD's four levels (so ``output_blocks.11.1`` exists), linear projections and
    64-wide heads, whose probe LayerNorm bias has the given spread; plus the tiny ViT-H-shaped text model."""
    from diffusers import UNet2DConditionModel

    parts = demo.build_tiny_sd2()
    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_config(dict(
        demo.TINY_UNET, in_channels=in_channels, use_linear_projection=True, upcast_attention=True,
        cross_attention_dim=demo.TINY_SD2_CLIP_WIDTH, attention_head_dim=[4, 4, 1, 1])).eval()
    name = next(k for k, ldm in layout.unet_key_map(unet.state_dict()).items() if ldm == V_PROBE)
    with torch.no_grad():
        unet.get_parameter(name).copy_(torch.randn(32, generator=torch.Generator().manual_seed(1)) * probe_std)
    return dict(parts, unet=unet)


@pytest.mark.parametrize(("in_channels", "probe_std", "expected"), [(4, 0.2, "v"), (4, 0.0, "eps"), (9, 0.2, "eps")])
def test_v_prediction_detected_from_the_weights_of_a_file_without_metadata(tmp_path, in_channels, probe_std,
                                                                           expected):
    parts = _tiny_four_level_sd2(in_channels, probe_std)
    path = tmp_path / "checkpoints" / "sd2.safetensors"
    demo.save_ldm_checkpoint(path, unet=parts["unet"], vae=parts["vae"], text_encoders=[parts["text_encoder"]],
                             family="sd2", embed_config=False)
    loaded = load_checkpoint_file(path, {"MODEL"}, use_cache=False)
    assert loaded.family == "sd2" and loaded.model.prediction == expected
    assert loaded.model.unet.config.in_channels == in_channels
    assert loaded.model.unet.config.use_linear_projection and loaded.model.unet.config.upcast_attention
    state = parts["unet"].state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.unet.state_dict().items())


# --- the OpenCLIP ViT-H text encoder -----------------------------------------------------------------------------

WIDTH, HEADS, LAYERS = 128, 2, 3


def _random_open_clip(vocab: int, prefix: str = layout.SD2_CLIP_PREFIX, seed: int = 3) -> dict[str, torch.Tensor]:
    """OpenCLIP text-transformer weights written directly in the LDM layout (not through our writer)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05, base: float = 0.0) -> torch.Tensor:
        return base + torch.randn(*shape, generator=g) * scale

    out = {"token_embedding.weight": rand(vocab, WIDTH, scale=0.5), "positional_embedding": rand(77, WIDTH),
           "ln_final.weight": rand(WIDTH, base=1.0), "ln_final.bias": rand(WIDTH),
           "text_projection": rand(WIDTH, WIDTH, scale=0.1), "logit_scale": torch.tensor(4.6)}
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        out |= {b + "ln_1.weight": rand(WIDTH, base=1.0), b + "ln_1.bias": rand(WIDTH),
                b + "attn.in_proj_weight": rand(3 * WIDTH, WIDTH, scale=0.1), b + "attn.in_proj_bias": rand(3 * WIDTH),
                b + "attn.out_proj.weight": rand(WIDTH, WIDTH, scale=0.1), b + "attn.out_proj.bias": rand(WIDTH),
                b + "ln_2.weight": rand(WIDTH, base=1.0), b + "ln_2.bias": rand(WIDTH),
                b + "mlp.c_fc.weight": rand(4 * WIDTH, WIDTH, scale=0.1), b + "mlp.c_fc.bias": rand(4 * WIDTH),
                b + "mlp.c_proj.weight": rand(WIDTH, 4 * WIDTH, scale=0.1), b + "mlp.c_proj.bias": rand(WIDTH)}
    return {prefix + k: v for k, v in out.items()}


def _reference_forward(ldm: dict[str, torch.Tensor], ids: torch.Tensor, prefix: str = layout.SD2_CLIP_PREFIX
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residual stream after each resblock, and the pooled output, computed from the LDM tensors."""
    w = {k[len(prefix):]: v.double() for k, v in ldm.items()}
    n, head = ids.shape[1], WIDTH // HEADS

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (WIDTH,), w[name + ".weight"], w[name + ".bias"], 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = w["token_embedding.weight"][ids] + w["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)
    states = []
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        qkv = norm(x, b + "ln_1") @ w[b + "attn.in_proj_weight"].T + w[b + "attn.in_proj_bias"]
        q, k, v = (t.reshape(ids.shape[0], n, HEADS, head).transpose(1, 2) for t in qkv.split(WIDTH, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head) + causal
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(ids.shape[0], n, WIDTH)
        x = x + linear(attended, b + "attn.out_proj")
        x = x + linear(F.gelu(linear(norm(x, b + "ln_2"), b + "mlp.c_fc")), b + "mlp.c_proj")
        states.append(x)
    final = norm(x, "ln_final")
    eos = ids.argmax(dim=-1)  # EOS is the largest id (SD 2.x pads with 0)
    pooled = final[torch.arange(ids.shape[0]), eos] @ w["text_projection"]
    return states, pooled


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd2-clip")
    vocab = len(demo.demo_tokenizer())
    ldm = _random_open_clip(vocab)
    path = root / "checkpoints" / "vit-h.safetensors"
    path.parent.mkdir()
    save_file(ldm, str(path))
    tok = root / "tokenizers" / "vit-h"
    tok.mkdir(parents=True)
    for name, text in demo.demo_tokenizer_files().items():
        (tok / name).write_text(text, encoding="utf-8")
    return path, ldm


def test_open_clip_conversion_round_trips_and_keeps_every_layer(open_clip_file):
    _, ldm = open_clip_file
    converted = layout.open_clip_from_ldm(ldm)
    assert f"text_model.encoder.layers.{LAYERS - 1}.self_attn.v_proj.weight" in converted
    assert converted["text_projection.weight"].shape == (WIDTH, WIDTH)
    back = layout.open_clip_to_ldm(converted, layout.SD2_CLIP_PREFIX)
    assert set(back) == set(ldm) - {layout.SD2_CLIP_PREFIX + "logit_scale"}
    assert all(torch.equal(back[k], ldm[k]) for k in back)


def test_sd2_text_encoder_matches_the_reference_forward(open_clip_file):
    path, ldm = open_clip_file
    loaded = load_checkpoint_file(path, {"CLIP"}, use_cache=False)
    clip = loaded.clip
    assert loaded.family == "sd2" and clip.family == "sd2" and type(clip.models[0]).__name__.endswith("Projection")
    assert clip.models[0].config.hidden_act == "gelu" and clip.models[0].config.num_attention_heads == HEADS
    text = "a photo of a cat sitting on a chair"
    tokens = tokenize_weighted(clip.tokenizers[0], text, pad_token=0)
    ids = torch.tensor([[t for t, _ in tokens.chunks[0]]])
    states, pooled = _reference_forward(ldm, ids)

    def final_norm(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (WIDTH,), ldm[layout.SD2_CLIP_PREFIX + "ln_final.weight"].double(),
                            ldm[layout.SD2_CLIP_PREFIX + "ln_final.bias"].double(), 1e-5)

    cond, info = encode_prompt(clip, text)
    assert info["layer"] == -2 and cond[0].cond.shape == (1, 77, WIDTH)
    torch.testing.assert_close(cond[0].cond.double(), final_norm(states[-2]), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cond[0].pooled_output.double(), pooled, atol=2e-5, rtol=1e-5)
    last, _ = encode_prompt(replace(clip, layer=-1), text)
    torch.testing.assert_close(last[0].cond.double(), final_norm(states[-1]), atol=2e-5, rtol=1e-5)
    first, _ = encode_prompt(replace(clip, layer=-LAYERS), text)
    torch.testing.assert_close(first[0].cond.double(), final_norm(states[0]), atol=2e-5, rtol=1e-5)


def test_sd2_tokens_pad_with_zero_and_pool_at_the_first_eos(open_clip_file):
    path, _ = open_clip_file
    clip = load_checkpoint_file(path, {"CLIP"}, use_cache=False).clip
    layer, encoders, layer_norm_hidden = encoder_settings(clip)
    assert layer == -2 and layer_norm_hidden and [(pad, key) for _, _, pad, key in encoders] == [(0, "clip_l")]
    tokens = tokenize_weighted(clip.tokenizers[0], "a cat", pad_token=0)
    ids = [t for t, _ in tokens.chunks[0]]
    eos = ids.index(tokens.end_token)
    assert ids[0] == tokens.start_token and ids[eos + 1:] == [0] * (77 - eos - 1)
    # the pad id 0 ("!") embeds differently from EOS: padding with EOS would change the conditioning
    padded_with_eos = [*ids[:eos + 1], *[tokens.end_token] * (77 - eos - 1)]
    with torch.no_grad():
        a = clip.models[0](input_ids=torch.tensor([ids])).last_hidden_state
        b = clip.models[0](input_ids=torch.tensor([padded_with_eos])).last_hidden_state
    assert torch.equal(a[0, :eos + 1], b[0, :eos + 1]) and not torch.equal(a[0, eos + 1:], b[0, eos + 1:])


def test_sd2_embeddings_are_used_at_the_text_width(open_clip_file, tmp_path):
    from safetensors.torch import save_file

    path, _ = open_clip_file
    clip = load_checkpoint_file(path, {"CLIP"}, use_cache=False).clip
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, WIDTH)}, str(tmp_path / "embeddings" / "style.safetensors"))
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "embeddings" / "sd1-style.safetensors"))
    clip = replace(clip, embeddings_dir=str(tmp_path / "embeddings"))
    _, info = encode_prompt(clip, "a photo in embedding:style and embedding:sd1-style")
    assert info["embeddings"] == ["style"] and "sd1-style" in info["missing_embeddings"]


def test_diffusers_sd2_text_encoder_counts_its_dropped_last_layer():
    """Diffusers stores 23 of ViT-H's 24 layers; ComfyUI's ``-2`` is then the last stored layer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = len(demo.demo_tokenizer())
    def model(layers: int) -> torch.nn.Module:
        config = dict(demo.tiny_sd2_clip_config(vocab), num_hidden_layers=layers)
        return CLIPTextModelWithProjection(CLIPTextConfig(**config, attn_implementation="eager")).eval()

    torch.manual_seed(0)
    full, stored = model(3), model(2)
    stored.load_state_dict({k: v for k, v in full.state_dict().items() if ".layers.2." not in k})
    setattr(stored, DROPPED_LAYERS_ATTR, 1)
    tokenizer = demo.demo_tokenizer()

    def encoder(model: torch.nn.Module, layer: int | None = None) -> TextEncoder:
        return TextEncoder(tokenizers=[tokenizer], models=[model], family="sd2", recipe=Recipe("t", "t"),
                           layer=layer)

    a, _ = encode_prompt(encoder(full), "a red house")
    b, _ = encode_prompt(encoder(stored), "a red house")
    assert torch.equal(a[0].cond, b[0].cond)
    with pytest.raises(ValueError, match="leave out"):
        encode_prompt(encoder(stored, layer=-1), "a red house")

    marked = torch.nn.Module()
    _mark_dropped_layers(marked, {"hidden_size": 1024, "num_hidden_layers": 23}, "sd2")
    assert getattr(marked, DROPPED_LAYERS_ATTR) == 1
    unmarked = torch.nn.Module()
    _mark_dropped_layers(unmarked, {"hidden_size": 1024, "num_hidden_layers": 24}, "sd2")
    assert not hasattr(unmarked, DROPPED_LAYERS_ATTR)


# --- diffusers folders -------------------------------------------------------------------------------------------


def test_sd2_diffusers_folder(tmp_path):
    import json

    parts = demo.build_tiny_sd2()
    folder = tmp_path / "checkpoints" / "sd2-diffusers"
    for name in ("unet", "vae", "text_encoder"):
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    (folder / "tokenizer").mkdir()
    for name, text in demo.demo_tokenizer_files().items():
        (folder / "tokenizer" / name).write_text(text, encoding="utf-8")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    loaded = load_checkpoint_file(folder, use_cache=False)
    assert loaded.family == "sd2" and loaded.model.prediction == "v" and loaded.clip.family == "sd2"
    assert loaded.model.unet.config.upcast_attention
    cond, _ = encode_prompt(loaded.clip, "a cat")
    assert cond[0].cond.shape == (1, 77, demo.TINY_SD2_CLIP_WIDTH)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(dict(config, in_channels=5)))
    with pytest.raises(ModelFileError, match="sd2-diffusers looks like a diffusers StableDiffusionPipeline with 5"):
        load_checkpoint_file(folder, {"VAE"}, use_cache=False)
