"""Checkpoint variants met in the wild, on tiny random-weight files written at the real key layouts: fp16/bf16/fp32
files, full-EMA checkpoints (``model_ema.*`` beside ``model.diffusion_model.*``) and LDM leftovers, SD 1.x/2.x with
a separate VAE, the SDXL refiner (bigG alone at ``conditioner.embedders.0.model.``), and the files
CheckpointLoaderSimple refuses (bare or diffusers-layout UNets, unCLIP) — refused before any tensor is read."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from airflow_comfy.runner.models import ModelFileError, demo, layout, load_checkpoint_file, load_vae_file
from airflow_comfy.runner.models.files import TensorReader
from airflow_comfy.runner.sampling.cfg import CFGDenoiser
from airflow_comfy.runner.text import encode_prompt


def _same_state(module: torch.nn.Module, reference: torch.nn.Module, dtype: torch.dtype | None = None) -> bool:
    a, b = module.state_dict(), reference.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(dtype) if dtype else b[k]) for k in a)


def _tokenizer(root: Path, stem: str) -> None:
    folder = root / "tokenizers" / stem
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in demo.demo_tokenizer_files().items():
        (folder / name).write_text(text, encoding="utf-8")


def _write(root: Path, name: str, parts: dict, family: str, **kw) -> Path:
    path = root / "checkpoints" / name
    encoders = [parts[k] for k in ("text_encoder", "text_encoder_2") if k in parts]
    demo.save_ldm_checkpoint(path, unet=parts["unet"], vae=parts["vae"], text_encoders=encoders, family=family,
                             embed_config=False, **kw)
    _tokenizer(root, path.stem)
    return path


@pytest.fixture(scope="module")
def sd1() -> dict:
    return demo.build_tiny_sd15()


@pytest.fixture(scope="module")
def sd2() -> dict:
    return demo.build_tiny_sd2()


def _cast(parts: dict, dtype: torch.dtype) -> dict:
    return {k: copy.deepcopy(v).to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_half_and_full_precision_files_load_in_the_run_dtype(tmp_path, sd1, sd2, family, file_dtype):
    parts = _cast(sd1 if family == "sd1" else sd2, file_dtype)
    path = _write(tmp_path, f"{family}.safetensors", parts, family)
    with TensorReader(path) as reader:
        assert reader.get(layout.UNET_PREFIX + "out.2.weight").dtype == file_dtype
    loaded = load_checkpoint_file(path, use_cache=False)
    assert loaded.family == family
    for module, reference in ((loaded.model.unet, parts["unet"]), (loaded.vae.vae, parts["vae"]),
                              (loaded.clip.models[0], parts["text_encoder"])):
        assert next(module.parameters()).dtype == torch.float32
        assert _same_state(module, reference, torch.float32)
    half = load_checkpoint_file(path, {"MODEL", "VAE"}, dtype=torch.float16, use_cache=False)
    assert next(half.model.unet.parameters()).dtype == torch.float16
    assert next(half.vae.vae.parameters()).dtype == torch.float32  # the VAE keeps its own dtype


def _ema_copy(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LDM's EMA tensors: ``model_ema.`` + the UNet's name without its dots, other values."""
    out = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
    for key, value in layout.unet_to_ldm(unet.state_dict(), prefix="diffusion_model.").items():
        out["model_ema." + key.replace(".", "")] = torch.full_like(value, 0.5)
    return out


def _ldm_leftovers(family: str) -> dict[str, torch.Tensor]:
    """What full LDM training checkpoints also hold: the noise schedule, CLIP's position ids / logit scale."""
    out = {name: torch.linspace(0.1, 0.9, 1000) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev")}
    if family == "sd1":
        out[layout.SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77.0).unsqueeze(0)
    else:
        out[layout.SD2_CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6)
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_ema_checkpoints_use_the_model_weights_as_comfyui_does(tmp_path, sd1, sd2, family):
    parts = sd1 if family == "sd1" else sd2
    extra = {**_ema_copy(parts["unet"]), **_ldm_leftovers(family)}
    path = _write(tmp_path, "full-ema.safetensors", parts, family, extra_tensors=extra)
    loaded = load_checkpoint_file(path, use_cache=False)
    assert loaded.family == family
    assert _same_state(loaded.model.unet, parts["unet"])  # model.diffusion_model.*, never model_ema.*
    assert _same_state(loaded.clip.models[0], parts["text_encoder"])
    cond, _ = encode_prompt(loaded.clip, "a cat")
    assert cond[0].cond.shape[-1] == parts["text_encoder"].config.hidden_size


def test_separate_vae_file_with_an_sd2_checkpoint(tmp_path, sd2):
    path = _write(tmp_path, "sd2.safetensors", sd2, "sd2")
    torch.manual_seed(0)
    other = copy.deepcopy(sd2["vae"])
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01)
    vae_path = tmp_path / "vae" / "other.safetensors"
    demo.save_ldm_vae(vae_path, other)
    vae = load_vae_file(vae_path, use_cache=False)
    assert _same_state(vae.vae, other) and vae.latent_scale == pytest.approx(0.18215)
    assert load_checkpoint_file(path, {"MODEL"}, use_cache=False).model.latent_scale == pytest.approx(0.18215)


# --- SDXL refiner -------------------------------------------------------------------------------------------------

REFINER_G, REFINER_POOLED, REFINER_TIME = 64, 48, 256  # time ids: 256-wide sinusoids, as the real refiner


def _tiny_refiner() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = len(demo.demo_tokenizer())
    torch.manual_seed(11)
    unet = UNet2DConditionModel.from_config(dict(
        demo.TINY_SDXL_UNET, cross_attention_dim=REFINER_G, addition_time_embed_dim=REFINER_TIME,
        projection_class_embeddings_input_dim=REFINER_POOLED + 5 * REFINER_TIME)).eval()
    vae = AutoencoderKL.from_config(demo.TINY_SDXL_VAE).eval()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**dict(
        demo.tiny_clip_config(vocab), hidden_size=REFINER_G, intermediate_size=128, hidden_act="gelu",
        projection_dim=REFINER_POOLED), attn_implementation="eager")).eval()
    return {"unet": unet, "vae": vae, "text_encoder_2": clip_g}


def test_sdxl_refiner_loads_encodes_and_denoises(tmp_path):
    parts = _tiny_refiner()
    path = _write(tmp_path, "refiner.safetensors", parts, "sdxl_refiner")
    with TensorReader(path) as reader:
        assert any(k.startswith("conditioner.embedders.0.model.transformer.resblocks.") for k in reader.keys)
        assert not any(k.startswith("conditioner.embedders.1.") for k in reader.keys)
    loaded = load_checkpoint_file(path, use_cache=False)
    assert loaded.family == "sdxl_refiner" and loaded.model.latent_scale == pytest.approx(0.13025)
    assert _same_state(loaded.model.unet, parts["unet"]) and _same_state(loaded.clip.models[0], parts["text_encoder_2"])
    positive, info = encode_prompt(loaded.clip, "a photo of a cat")
    negative, _ = encode_prompt(loaded.clip, "blurry")
    assert info["layer"] == -2
    assert positive[0].cond.shape == (1, 77, REFINER_G) and positive[0].pooled_output.shape == (1, REFINER_POOLED)
    denoiser = CFGDenoiser(loaded.model, positive, negative, 5.0)
    out = denoiser(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0]))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and denoiser.calls == 1


# --- refused before anything is read ------------------------------------------------------------------------------


@pytest.fixture
def no_reads(monkeypatch):
    def refuse(self, key):
        raise AssertionError(f"read {key} before refusing the file")

    monkeypatch.setattr(TensorReader, "get", refuse)


def test_bare_and_diffusers_layout_unets_are_refused_clearly(tmp_path, sd2, no_reads):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    bare = layout.unet_to_ldm(sd2["unet"].state_dict(), prefix="")
    save_file({k: v.contiguous() for k, v in bare.items()}, str(folder / "unet-only.safetensors"))
    save_file({k: v.contiguous() for k, v in sd2["unet"].state_dict().items()}, str(folder / "diffusers.safetensors"))
    with pytest.raises(ModelFileError, match=r"^checkpoints/unet-only.safetensors looks like a bare UNet .*"
                                             r"supported: SD 1.x, SD 2.x"):
        load_checkpoint_file(folder / "unet-only.safetensors", use_cache=False)
    with pytest.raises(ModelFileError, match=r"^checkpoints/diffusers.safetensors looks like a diffusers-layout UNet"):
        load_checkpoint_file(folder / "diffusers.safetensors", {"VAE"}, use_cache=False)


def test_unclip_is_refused_before_anything_is_read(tmp_path, sd2, no_reads):
    from diffusers import UNet2DConditionModel

    unclip = UNet2DConditionModel.from_config(dict(demo.TINY_SD2_UNET, class_embed_type="projection",
                                                   projection_class_embeddings_input_dim=96)).eval()
    path = _write(tmp_path, "unclip.safetensors", dict(sd2, unet=unclip), "sd2")
    with pytest.raises(ModelFileError, match=r"unclip.safetensors looks like an SD 2.1 unCLIP checkpoint \(its UNet "
                                             r"takes a 96-wide image/class embedding\)"):
        load_checkpoint_file(path, {"VAE"}, use_cache=False)
