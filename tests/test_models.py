"""Model loading: demo models, single-file checkpoints, LoRA, ControlNet, ESRGAN and model-file safety."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from airflow_comfy.runner.models import (
    ModelFileError,
    apply_lora,
    apply_lora_file,
    apply_lora_state_dict,
    cache,
    clear_cache,
    control_residuals,
    demo,
    detect_family,
    layout,
    load_checkpoint,
    load_checkpoint_file,
    load_control_net,
    load_controlnet_file,
    load_embedding,
    load_upscale_model_file,
    load_vae,
    load_vae_file,
    make_demo_models,
    prepare_hint,
    read_state_dict,
    resolve_model_file,
    sha256_of,
    shipped_config,
    upscale_image,
)
from airflow_comfy.runner.models.checkpoint import cached_entries
from airflow_comfy.runner.models.config import _clip_config
from airflow_comfy.runner.models.files import TensorReader, list_model_files

CKPT = demo.DEMO_CHECKPOINT

EXPECTED_FILES = [
    "checkpoints/demo-sd15-tiny.safetensors",
    "checkpoints/demo-sdxl-tiny.safetensors",
    "controlnet/demo-controlnet.safetensors",
    "embeddings/demo-embedding.safetensors",
    "loras/demo-lora.safetensors",
    "tokenizers/demo-sd15-tiny/merges.txt",
    "tokenizers/demo-sd15-tiny/special_tokens_map.json",
    "tokenizers/demo-sd15-tiny/tokenizer_config.json",
    "tokenizers/demo-sd15-tiny/vocab.json",
    "tokenizers/demo-sdxl-tiny/merges.txt",
    "tokenizers/demo-sdxl-tiny/special_tokens_map.json",
    "tokenizers/demo-sdxl-tiny/tokenizer_config.json",
    "tokenizers/demo-sdxl-tiny/vocab.json",
    "upscale_models/demo-esrgan-x2.safetensors",
    "vae/demo-vae.safetensors",
]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    written = make_demo_models(root)
    assert sorted(p.relative_to(root).as_posix() for p in written) == EXPECTED_FILES
    clear_cache()
    return root


@pytest.fixture(scope="module")
def tiny():
    return demo.build_tiny_sd15()


@pytest.fixture(scope="module")
def loaded(models):
    return load_checkpoint_file(models / "checkpoints" / CKPT, use_cache=False)


def _ctx(root: Path, **kw) -> SimpleNamespace:
    return SimpleNamespace(models_root=root, allow_pickle=False, device=torch.device("cpu"), dtype=torch.float32,
                           model_files={}, **kw)


# --- demo models ------------------------------------------------------------------------------------------------


def test_demo_models_are_deterministic(models, tmp_path):
    make_demo_models(tmp_path)
    assert _digests(tmp_path) == _digests(models)
    sizes = {name: (models / name).stat().st_size for name in EXPECTED_FILES}
    assert sizes["checkpoints/demo-sd15-tiny.safetensors"] < 20_000_000
    assert sizes["loras/demo-lora.safetensors"] < 1_000_000


def test_demo_tokenizer_is_clip_layout(models):
    vocab = json.loads((models / "tokenizers/demo-sd15-tiny/vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 256 * 2 + demo.NUM_MERGES + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab[","] == 11  # CLIP's byte order: printable characters first
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    merges = (models / "tokenizers/demo-sd15-tiny/merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == demo.NUM_MERGES + 1
    config = json.loads((models / "tokenizers/demo-sd15-tiny/tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77


# --- checkpoints ------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_exact(loaded, tiny):
    assert loaded.family == "sd1"
    assert _same_state(loaded.model.unet, tiny["unet"])
    assert _same_state(loaded.vae.vae, tiny["vae"])
    assert _same_state(loaded.clip.models[0], tiny["text_encoder"])
    assert loaded.model.latent_scale == pytest.approx(0.18215)
    assert loaded.vae.latent_scale == pytest.approx(0.18215)
    assert loaded.model.recipe.file == CKPT and loaded.model.recipe.loader == "CheckpointLoaderSimple"
    assert loaded.clip.models[0].config._attn_implementation == "eager"
    assert loaded.tensors_read == loaded.tensors_total


def test_vae_only_reads_only_vae_tensors(models):
    path = models / "checkpoints" / CKPT
    part = load_checkpoint_file(path, {"VAE"}, use_cache=False)
    assert part.model is None and part.clip is None and part.vae is not None
    with TensorReader(path) as reader:
        vae_keys = [k for k in reader.keys if k.startswith("first_stage_model.")]
        total = len(reader.keys)
    assert part.tensors_read == len(vae_keys) < total
    model_only = load_checkpoint_file(path, {"MODEL"}, use_cache=False)
    assert model_only.vae is None and model_only.clip is None
    assert model_only.tensors_read == sum(1 for k in TensorReader(path).keys if k.startswith("model.diffusion_model."))


def test_tiny_model_forward(loaded):
    tokenizer = loaded.clip.tokenizers[0]
    assert tokenizer.model_max_length == 77
    ids = tokenizer("a photo of a cat, (masterpiece:1.2)", padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id and ids.shape == (1, 77)
    with torch.no_grad():
        hidden = loaded.clip.models[0](ids).last_hidden_state
        assert hidden.shape == (1, 77, 32)
        out = loaded.model.unet(torch.randn(1, 4, 8, 8), torch.tensor(999.0), encoder_hidden_states=hidden).sample
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        image = loaded.vae.vae.decode(out / 0.18215).sample
        assert image.shape == (1, 3, 64, 64)


class _ShapeOnly:
    """Stands in for a text model in diffusers' open-clip converter (it reads ``config.hidden_size`` only)."""

    def __init__(self, hidden_size: int) -> None:
        self.config = SimpleNamespace(hidden_size=hidden_size)


def _previous_loader(path: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, dict]:
    """The state dicts the loader gave before it read LDM files with its own key plans: diffusers' converters
    over the whole prefixed component, then the module built from the converted state dict."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    from airflow_comfy.runner.models.building import build_text_encoder, build_unet, build_vae
    from airflow_comfy.runner.models.config import _unet_config, _vae_config, embedded_config
    from airflow_comfy.runner.models.single_file import _clip_parts

    def shapes(sd, prefix=""):
        return {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}

    with TensorReader(path) as reader:
        family = detect_family(reader.keys, reader.shape, reader.metadata)
        configs = (embedded_config(reader.metadata) or {}).get("configs", {})
        raw = reader.read(layout.UNET_PREFIX)
        config = configs.get("unet") or _unet_config(shapes(raw, layout.UNET_PREFIX), family)
        out = {"unet": build_unet(config, convert_ldm_unet_checkpoint(raw, config), dtype=dtype).state_dict()}
        raw = reader.read(layout.VAE_PREFIX)
        config = configs.get("vae") or _vae_config(shapes(raw, layout.VAE_PREFIX), family)
        out["vae"] = build_vae(config, convert_ldm_vae_checkpoint(raw, config), dtype=vae_dtype).state_dict()
        for role, prefix, open_clip in _clip_parts(family, reader.keys):
            raw = reader.read(prefix)
            if family == "sd2":  # the previous loader's own converter
                converted = layout.open_clip_from_ldm(raw, prefix)
            elif open_clip:
                hidden = raw[prefix + "token_embedding.weight"].shape[1]
                converted = convert_open_clip_checkpoint(_ShapeOnly(hidden), dict(raw), prefix=prefix)
                converted = {k: v for k, v in converted.items() if v is not None}
            else:
                converted = layout.hf_clip_keys(convert_ldm_clip_checkpoint(dict(raw)))
            config = configs.get(role) or _clip_config(shapes(converted), family, role)
            projection = open_clip and "text_projection.weight" in converted
            out[role] = build_text_encoder(config, converted, with_projection=projection, dtype=dtype).state_dict()
    return out


def _sd15_layout_small(folder: Path) -> Path:
    """An SD 1.5 single file with the real key names and block structure but narrow widths, in fp16, without an
    embedded config (the configs come from the shapes, as for a downloaded file)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(dict(shipped_config("sd1", "unet"), block_out_channels=[32, 64, 128, 128],
                                                 cross_attention_dim=32))
    vae = AutoencoderKL.from_config(dict(shipped_config("sd1", "vae"), block_out_channels=[32, 64, 128, 128]))
    vocab = len(demo.demo_tokenizer())
    clip = CLIPTextModel(CLIPTextConfig(**dict(demo.tiny_clip_config(vocab), num_hidden_layers=12)))
    for module in (unet, vae, clip):  # non-trivial norms and biases
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.2)
        module.half()
    path = folder / "checkpoints" / "sd15-layout-small.safetensors"
    demo.save_ldm_checkpoint(path, unet=unet, vae=vae, text_encoders=[clip], embed_config=False)
    shutil.copytree(_demo_tokenizer_dir(folder), folder / "tokenizers" / path.stem)
    return path


def _sd15_key_names() -> set[str]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_config("sd1", "unet"))
        vae = AutoencoderKL.from_config(shipped_config("sd1", "vae"))
        clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in shipped_config("sd1", "text_encoder").items()
                                               if k not in ("architectures", "model_type")}))
        return {*layout.unet_to_ldm(unet.state_dict()), *layout.vae_to_ldm(vae.state_dict()),
                *layout.clip_to_ldm(clip.state_dict())}


@pytest.mark.parametrize("which", ["demo-sd15", "demo-sdxl", "demo-sd2", "demo-sd2-inpaint", "sd15-layout-fp16"])
def test_loader_is_bit_identical_to_the_previous_loader(which, models, tmp_path):
    """Our LDM key plans, each tensor read once into the run's dtype, give exactly the parameters that
    diffusers' converters gave (same names, dtypes, bits), in fp32 and, for the fp16 file, in fp16."""
    if which == "sd15-layout-fp16":
        path = _sd15_layout_small(tmp_path)
        keys = set(TensorReader(path).keys)
        assert keys == _sd15_key_names()  # the real SD 1.5 key layout
        dtypes = [torch.float32, torch.float16]
    elif which.startswith("demo-sd2"):
        demo.make_sd2_demo_models(tmp_path)
        path = tmp_path / "checkpoints" / f"{which}-tiny.safetensors"
        dtypes = [torch.float32]
    else:
        path = models / "checkpoints" / f"{which}-tiny.safetensors"
        dtypes = [torch.float32]
    for dtype in dtypes:
        expected = _previous_loader(path, dtype, torch.float32)
        loaded = load_checkpoint_file(path, dtype=dtype, vae_dtype=torch.float32, use_cache=False)
        got = {"unet": loaded.model.unet.state_dict(), "vae": loaded.vae.vae.state_dict(),
               "text_encoder": loaded.clip.models[0].state_dict()}
        if len(loaded.clip.models) > 1:
            got["text_encoder_2"] = loaded.clip.models[1].state_dict()
        assert got.keys() == expected.keys()
        for part, state in got.items():
            assert state.keys() == expected[part].keys(), part
            for key, tensor in state.items():
                old = expected[part][key]
                assert tensor.dtype == old.dtype and torch.equal(tensor, old), (which, dtype, part, key)
                assert tensor.is_contiguous(), (part, key)
        assert loaded.tensors_read == loaded.tensors_total


def test_configs_derived_from_shapes_without_metadata(tiny, tmp_path):
    path = tmp_path / "checkpoints" / "plain.safetensors"
    demo.save_ldm_checkpoint(path, unet=tiny["unet"], vae=tiny["vae"], text_encoders=[tiny["text_encoder"]],
                             embed_config=False)
    (tmp_path / "tokenizers").mkdir()
    shutil.copytree(_demo_tokenizer_dir(tmp_path), tmp_path / "tokenizers" / "clip")
    loaded = load_checkpoint_file(path, use_cache=False)
    assert _same_state(loaded.model.unet, tiny["unet"])
    assert _same_state(loaded.vae.vae, tiny["vae"])
    assert _same_state(loaded.clip.models[0], tiny["text_encoder"])
    for key in ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                "down_block_types", "up_block_types", "use_linear_projection"):
        assert loaded.model.unet.config[key] == tiny["unet"].config[key], key
    assert loaded.clip.models[0].config.num_attention_heads == 4
    assert loaded.clip.models[0].config.eos_token_id == tiny["text_encoder"].config.eos_token_id


def _demo_tokenizer_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "_tok"
    if not folder.exists():
        folder.mkdir()
        for name, text in demo.demo_tokenizer_files().items():
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def _tiny_sdxl():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(dict(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64], layers_per_block=2,
        transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)).eval()
    vae = AutoencoderKL.from_config(dict(demo.TINY_VAE, scaling_factor=0.13025)).eval()
    vocab = len(demo.demo_tokenizer())
    clip_l = CLIPTextModel(CLIPTextConfig(**demo.tiny_clip_config(vocab), attn_implementation="eager")).eval()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**dict(demo.tiny_clip_config(vocab), hidden_act="gelu",
                                                                projection_dim=32), attn_implementation="eager")).eval()
    return unet, vae, clip_l, clip_g


def test_sdxl_single_file_round_trip(tmp_path):
    unet, vae, clip_l, clip_g = _tiny_sdxl()
    path = tmp_path / "checkpoints" / "tiny-xl.safetensors"
    demo.save_ldm_checkpoint(path, unet=unet, vae=vae, text_encoders=[clip_l, clip_g], family="sdxl")
    keys = TensorReader(path).keys
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert detect_family(keys) == "sdxl"
    shutil.copytree(_demo_tokenizer_dir(tmp_path), tmp_path / "tokenizers" / "tiny-xl")
    loaded = load_checkpoint_file(path, use_cache=False)
    assert loaded.family == "sdxl" and loaded.model.latent_scale == pytest.approx(0.13025)
    assert _same_state(loaded.model.unet, unet) and _same_state(loaded.vae.vae, vae)
    assert _same_state(loaded.clip.models[0], clip_l) and _same_state(loaded.clip.models[1], clip_g)
    assert loaded.clip.tokenizers[1].pad_token == "!"
    with torch.no_grad():
        ids = loaded.clip.tokenizers[0]("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = torch.cat([loaded.clip.models[0](ids).last_hidden_state,
                            loaded.clip.models[1](ids).last_hidden_state], dim=-1)
        pooled = loaded.clip.models[1](ids).text_embeds
        out = loaded.model.unet(torch.randn(1, 4, 8, 8), torch.tensor(10.0), encoder_hidden_states=hidden,
                                added_cond_kwargs={"text_embeds": pooled,
                                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample
    assert out.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_shipped_configs_agree_with_shape_derivation(family):
    """Real-size SD 1.5 / SDXL modules on the meta device -> LDM key layout -> configs derived from shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from airflow_comfy.runner.models.config import _unet_config, _vae_config

    for cls, name, to_ldm, derive in ((UNet2DConditionModel, "unet", layout.unet_to_ldm, _unet_config),
                                      (AutoencoderKL, "vae", layout.vae_to_ldm, _vae_config)):
        shipped = shipped_config(family, name)
        with torch.device("meta"):
            module = cls.from_config(shipped)
            shapes = {k: tuple(v.shape) for k, v in to_ldm(module.state_dict(), prefix="").items()}
            rebuilt = cls.from_config(derive(shapes, family))
        public = {k: v for k, v in module.config.items() if not k.startswith("_")}
        assert {k: rebuilt.config[k] for k in public} == public
    roles = ["text_encoder"] if family == "sd1" else ["text_encoder", "text_encoder_2"]
    for role in roles:
        shipped = shipped_config(family, role)
        with_projection = role == "text_encoder_2"
        config = CLIPTextConfig(**{k: v for k, v in shipped.items() if k not in ("architectures", "model_type")})
        with torch.device("meta"):
            model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
            to_ldm = layout.open_clip_to_ldm if with_projection else layout.clip_to_ldm
            ldm = {k: tuple(v.shape) for k, v in to_ldm(model.state_dict(), prefix="").items()}
        derived = _clip_config(layout.clip_shapes_from_ldm(ldm, open_clip=with_projection), family, role)
        assert {k: v for k, v in shipped.items() if k not in ("architectures", "model_type")} == derived


def test_family_detection_and_unsupported_families():
    assert detect_family(["model.diffusion_model.input_blocks.0.0.weight",
                          "cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert detect_family(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_family(["conditioner.embedders.0.model.ln_final.weight"]) == "sdxl_refiner"
    assert detect_family(["cond_stage_model.model.ln_final.weight"]) == "sd2"
    with pytest.raises(ModelFileError, match="Flux"):
        detect_family(["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"])
    with pytest.raises(ModelFileError, match="not a Stable Diffusion"):
        detect_family(["foo.weight"], label="checkpoints/x.safetensors")


def test_cache_serves_repeated_and_smaller_loads(models):
    clear_cache()
    path = models / "checkpoints" / CKPT
    first = load_checkpoint_file(path)
    again = load_checkpoint_file(path)
    vae_only = load_checkpoint_file(path, {"VAE"})
    assert not first.from_cache and again.from_cache and vae_only.from_cache
    assert again.model.unet is first.model.unet and vae_only.vae.vae is first.vae.vae
    assert vae_only.model is None and again.model is not first.model  # fresh containers, shared modules
    clear_cache()


def _overwrite_tensor(path: Path, key: str, value: float) -> None:
    """Write ``value`` over every element of tensor ``key`` of a float32 safetensors file, in place: the same
    size, and the file's mtime set back to what it was (only its ctime tells)."""
    before = path.stat()
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8:8 + header_size])[key]
    assert entry["dtype"] == "F32"
    begin, end = (8 + header_size + offset for offset in entry["data_offsets"])
    with open(path, "r+b") as handle:
        handle.seek(begin)
        handle.write(torch.full(((end - begin) // 4,), value, dtype=torch.float32).numpy().tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_the_cache_knows_a_checkpoint_by_its_content(models, tmp_path):
    for name in ("a.safetensors", "b.safetensors"):  # two copies: two names, two inodes, one content
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        shutil.copy(models / "checkpoints" / CKPT, tmp_path / "checkpoints" / name)
    ctx = _ctx(tmp_path)
    clear_cache()
    first = load_checkpoint(ctx, "a.safetensors", {"MODEL"})
    second = load_checkpoint(ctx, "b.safetensors", {"MODEL"})
    assert not first.from_cache and first.tensors_read > 0
    assert second.from_cache and second.tensors_read == 0 and second.model.unet is first.model.unet
    assert second.path == tmp_path / "checkpoints" / "b.safetensors"
    assert second.model.recipe.file == "b.safetensors" and first.model.recipe.file == "a.safetensors"
    assert ctx.model_files["checkpoints/a.safetensors"] == ctx.model_files["checkpoints/b.safetensors"]
    assert len(cached_entries()) == 1

    key = "model.diffusion_model.out.2.bias"
    _overwrite_tensor(tmp_path / "checkpoints" / "b.safetensors", key, 7.0)
    changed = load_checkpoint(ctx, "b.safetensors", {"MODEL"})
    assert not changed.from_cache and changed.tensors_read > 0
    assert torch.all(changed.model.unet.conv_out.bias == 7.0) and not torch.all(first.model.unet.conv_out.bias == 7.0)
    assert ctx.model_files["checkpoints/b.safetensors"] == sha256_of(tmp_path / "checkpoints" / "b.safetensors")
    assert ctx.model_files["checkpoints/b.safetensors"] != ctx.model_files["checkpoints/a.safetensors"]
    assert load_checkpoint(ctx, "a.safetensors", {"MODEL"}).from_cache  # the unchanged copy is still cached
    clear_cache()


def test_a_memory_budget_keeps_the_last_checkpoint_and_loads_an_evicted_one_again(models, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(models / "checkpoints" / CKPT, tmp_path / "checkpoints" / name)
    _overwrite_tensor(tmp_path / "checkpoints" / "b.safetensors", "model.diffusion_model.out.2.bias", 7.0)
    ctx = _ctx(tmp_path)
    clear_cache()
    try:
        cache.set_memory_budget(2**40)
        first = load_checkpoint(ctx, "a.safetensors", {"MODEL"})
        one_model = cache.stats().nbytes
        assert one_model == cache.tensor_bytes(first.model.unet) > 0
        cache.set_memory_budget(one_model * 3 // 2)  # room for one of the two
        assert load_checkpoint(ctx, "a.safetensors", {"MODEL"}).model.unet is first.model.unet
        assert not load_checkpoint(ctx, "b.safetensors", {"MODEL"}).from_cache
        assert cache.stats().nbytes == one_model and len(cached_entries()) == 1
        again = load_checkpoint(ctx, "a.safetensors", {"MODEL"})  # evicted: read from disk again
        assert not again.from_cache and again.model.unet is not first.model.unet
        assert _same_state(again.model.unet, first.model.unet)
    finally:
        cache.set_memory_budget(None)
        clear_cache()


def test_run_context_entry_points_record_hashes(models):
    ctx = _ctx(models)
    loaded = load_checkpoint(ctx, CKPT, {"MODEL", "CLIP"})
    assert loaded.vae is None and loaded.clip.embeddings_dir == str(models / "embeddings")
    vae = load_vae(ctx, demo.DEMO_VAE)
    assert vae.recipe.loader == "VAELoader" and not _same_state(vae.vae, load_checkpoint(ctx, CKPT, {"VAE"}).vae.vae)
    emb = load_embedding(ctx, "demo-embedding", width=32)
    assert emb.shape == (1, 32)
    assert ctx.model_files[f"checkpoints/{CKPT}"] == sha256_of(models / "checkpoints" / CKPT)
    assert set(ctx.model_files) == {f"checkpoints/{CKPT}", f"vae/{demo.DEMO_VAE}",
                                    "embeddings/demo-embedding.safetensors"}
    clear_cache()


def test_missing_tokenizer_is_a_clear_error(models, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(models / "checkpoints" / CKPT, tmp_path / "checkpoints" / CKPT)
    path = tmp_path / "checkpoints" / CKPT
    assert load_checkpoint_file(path, {"MODEL"}, use_cache=False).model is not None
    with pytest.raises(ModelFileError, match=r"no CLIP tokenizer found.*tokenizers/clip"):
        load_checkpoint_file(path, {"CLIP"}, use_cache=False)
    wrong = tmp_path / "tokenizers" / "clip"
    wrong.mkdir(parents=True)
    vocab, merges = demo.learn_bpe("just a few words here", 5)
    (wrong / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (wrong / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"tokens but the SD 1\.x text encoder \(CLIP ViT-L/14\) has 714"):
        load_checkpoint_file(path, {"CLIP"}, use_cache=False)


def test_a_missing_sd2_tokenizer_is_named_for_sd2(tmp_path):
    (path, _) = (p for p in demo.make_sd2_demo_models(tmp_path) if p.suffix == ".safetensors")
    shutil.rmtree(tmp_path / "tokenizers")  # the demo vocabulary is not CLIP's: nothing to fall back on
    message = (r"checkpoints/demo-sd2-tiny.safetensors: no CLIP tokenizer found for the SD 2\.x text encoder "
               r"\(OpenCLIP ViT-H/14\), whose vocabulary has 714 tokens .*put that encoder's vocab\.json and "
               r"merges\.txt into <models>/tokenizers/clip/")
    with pytest.raises(ModelFileError, match=message):
        load_checkpoint_file(path, {"CLIP"}, use_cache=False)


def test_diffusers_folder_checkpoint(tiny, models, tmp_path):
    folder = tmp_path / "checkpoints" / "tiny-diffusers"
    for name in ("unet", "vae"):
        tiny[name].save_pretrained(folder / name, safe_serialization=True)
    tiny["text_encoder"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    shutil.copytree(models / "tokenizers" / "demo-sd15-tiny", folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    assert "tiny-diffusers" in list_model_files(tmp_path, "checkpoints")
    path = resolve_model_file(tmp_path, "checkpoints", "tiny-diffusers", allow_dir=True)
    loaded = load_checkpoint_file(path, use_cache=False)
    assert loaded.family == "sd1"
    assert _same_state(loaded.model.unet, tiny["unet"]) and _same_state(loaded.vae.vae, tiny["vae"])
    assert _same_state(loaded.clip.models[0], tiny["text_encoder"])
    assert len(sha256_of(path)) == 64


def test_vae_file_in_diffusers_layout(tiny, tmp_path):
    path = tmp_path / "vae" / "d.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in tiny["vae"].state_dict().items()}, str(path))
    vae = load_vae_file(path, use_cache=False)
    assert _same_state(vae.vae, tiny["vae"])
    assert _same_state(load_vae(path).vae, tiny["vae"])  # load_vae(path) == load_vae_file(path)


# --- LoRA -------------------------------------------------------------------------------------------------------


def _lora_path(models: Path) -> Path:
    return models / "loras" / demo.DEMO_LORA


def test_lora_strength_zero_returns_inputs(loaded, models):
    model, clip = apply_lora_file(loaded.model, loaded.clip, _lora_path(models), 0.0, 0.0)
    assert model is loaded.model and clip is loaded.clip


def test_lora_merges_into_copies(loaded, models):
    base_unet = {k: v.clone() for k, v in loaded.model.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in loaded.clip.models[0].state_dict().items()}
    model, clip = apply_lora_file(loaded.model, loaded.clip, _lora_path(models), 1.0, 0.5)
    new_unet = model.unet.state_dict()
    changed = sorted(k for k in new_unet if not torch.equal(new_unet[k], base_unet[k]))
    assert changed and all(".attn" in k and k.endswith(".weight") for k in changed)
    new_text = clip.models[0].state_dict()
    assert any(not torch.equal(new_text[k], base_text[k]) for k in new_text)
    # the cached base is untouched and unchanged tensors are shared, not copied
    assert all(torch.equal(v, base_unet[k]) for k, v in loaded.model.unet.state_dict().items())
    assert all(torch.equal(v, base_text[k]) for k, v in loaded.clip.models[0].state_dict().items())
    assert new_unet["conv_in.weight"].data_ptr() == loaded.model.unet.state_dict()["conv_in.weight"].data_ptr()
    assert model.recipe.patches == (("lora", demo.DEMO_LORA, 1.0, 0.5),)
    assert clip.recipe.patches == model.recipe.patches and loaded.model.recipe.patches == ()
    # the merge is W + strength * alpha/rank * up @ down
    lora = read_state_dict(_lora_path(models))
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    expected = base_unet[key] + (2.0 / 4) * lora[f"{base}.lora_up.weight"] @ lora[f"{base}.lora_down.weight"]
    assert torch.allclose(new_unet[key], expected, atol=1e-6)
    # model strength only: the text encoder stays the base one
    model_only, clip_same = apply_lora_file(loaded.model, loaded.clip, _lora_path(models), 0.7, 0.0)
    assert clip_same.models[0] is loaded.clip.models[0] and model_only.unet is not loaded.model.unet


def test_lora_ldm_and_peft_names_match_kohya(loaded, models):
    lora = read_state_dict(_lora_path(models))
    kohya_model, _ = apply_lora_file(loaded.model, None, _lora_path(models), 1.0, 0.0)
    to_ldm = layout.unet_key_map(loaded.model.unet.state_dict())
    ldm_named, peft_named = {}, {}
    for key, value in lora.items():
        if not key.startswith("lora_unet_"):
            continue
        base, _, suffix = key.partition(".")
        module = next(m for m in (k.rpartition(".")[0] for k in to_ldm) if m.replace(".", "_") == base[10:])
        ldm_module = to_ldm[module + ".weight"].rpartition(".")[0]
        ldm_named[f"lora_unet_{ldm_module.replace('.', '_')}.{suffix}"] = value
        if suffix != "alpha":
            peft_suffix = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}[suffix]
            scale = 0.5 if suffix == "lora_up.weight" else 1.0  # alpha/rank folded in (peft has no alpha)
            peft_named[f"unet.{module}.{peft_suffix}"] = value * scale
    for state in (ldm_named, peft_named):
        model, _ = apply_lora_state_dict(loaded.model, None, state, 1.0, 0.0, name="x")
        ours, kohya = model.unet.state_dict(), kohya_model.unet.state_dict()
        assert ours.keys() == kohya.keys()
        assert all(torch.allclose(ours[k], kohya[k], atol=1e-6) for k in ours)


def test_lora_unmatched_keys(loaded, tmp_path, caplog):
    bad = {"lora_unet_no_such_module.lora_up.weight": torch.ones(4, 2),
           "lora_unet_no_such_module.lora_down.weight": torch.ones(2, 4)}
    path = tmp_path / "loras" / "bad.safetensors"
    path.parent.mkdir()
    save_file(bad, str(path))
    with pytest.raises(ModelFileError, match=r"loras/bad.safetensors: no LoRA weight matches"):
        apply_lora_file(loaded.model, loaded.clip, path, 1.0, 1.0)
    good = read_state_dict(Path(str(_models_root(loaded))) / "loras" / demo.DEMO_LORA)
    with caplog.at_level(logging.WARNING, logger="airflow_comfy.runner.models.lora"):
        apply_lora_state_dict(loaded.model, loaded.clip, {**good, **bad}, 1.0, 1.0, name="mixed")
    assert "1 LoRA entries did not match" in caplog.text


def _models_root(loaded) -> Path:
    return loaded.path.parent.parent


def test_apply_lora_with_run_context(loaded, models):
    ctx = _ctx(models)
    model, clip = apply_lora(ctx, loaded.model, loaded.clip, demo.DEMO_LORA, 1.0, 1.0)
    assert model.recipe.patches[-1][1] == demo.DEMO_LORA
    assert f"loras/{demo.DEMO_LORA}" in ctx.model_files
    with pytest.raises(ModelFileError, match="not found"):
        apply_lora(ctx, loaded.model, loaded.clip, "nope.safetensors", 1.0, 1.0)


# --- ControlNet -------------------------------------------------------------------------------------------------


def test_controlnet_residuals_fit_the_unet(loaded, models, tiny):
    control = load_controlnet_file(models / "controlnet" / demo.DEMO_CONTROLNET, use_cache=False)
    assert _same_state(control.model, demo.build_tiny_controlnet(tiny["unet"]))
    x = torch.randn(2, 4, 8, 8)
    cond = torch.randn(2, 77, 32)
    hint = torch.rand(1, 48, 80, 3)
    with torch.no_grad():
        down, mid = control_residuals(control, x, torch.tensor(500.0), cond, hint, 1.0)
        half, mid_half = control_residuals(control, x, torch.tensor(500.0), cond, hint, 0.5)
    # shapes of the UNet's own down-block residuals
    shapes = []
    unet = loaded.model.unet
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(tuple(t.shape) for t in o[1])))
    with torch.no_grad():
        plain = unet(x, torch.tensor(500.0), encoder_hidden_states=cond).sample
        for h in hooks:
            h.remove()
        controlled = unet(x, torch.tensor(500.0), encoder_hidden_states=cond, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
    assert [tuple(t.shape) for t in down] == shapes
    assert mid.shape == (2, 64, 1, 1)
    assert not torch.allclose(plain, controlled)
    assert any(t.abs().max() > 0 for t in down)
    for full, scaled in zip((*down, mid), (*half, mid_half), strict=True):
        assert torch.allclose(full * 0.5, scaled, atol=1e-6)


def test_controlnet_hint_preparation():
    hint = torch.zeros(1, 30, 60, 3)
    hint[:, :, 15:45, 0] = 1.0  # a centred square in the red channel
    out = prepare_hint(hint, 32, 32, 3)
    assert out.shape == (3, 3, 32, 32)
    assert torch.equal(out[:, 0], torch.ones(3, 32, 32))  # centre crop keeps only the square
    two = prepare_hint(torch.rand(2, 16, 16, 3), 16, 16, 4, batched_number=2)
    assert two.shape == (4, 3, 16, 16) and torch.equal(two[0], two[2])


def test_controlnet_diffusers_layout_and_t2i_adapter(models, tiny, tmp_path):
    reference = demo.build_tiny_controlnet(tiny["unet"])
    path = tmp_path / "controlnet" / "diffusers-layout.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    assert _same_state(load_controlnet_file(path, use_cache=False).model, reference)
    adapter = tmp_path / "controlnet" / "t2iadapter_depth.safetensors"
    save_file({"adapter.body.0.resnets.0.block1.weight": torch.zeros(4, 4, 3, 3),
               "adapter.conv_in.weight": torch.zeros(4, 48, 3, 3)}, str(adapter))
    with pytest.raises(ModelFileError, match="T2I-Adapter.*not supported yet"):
        load_controlnet_file(adapter)
    ctx = _ctx(models)
    control = load_control_net(ctx, demo.DEMO_CONTROLNET)
    assert control.recipe.loader == "ControlNetLoader" and f"controlnet/{demo.DEMO_CONTROLNET}" in ctx.model_files


# --- ESRGAN -----------------------------------------------------------------------------------------------------


def _to_new_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from airflow_comfy.runner.models.esrgan import convert_original_esrgan

    return convert_original_esrgan(old)


def test_esrgan_both_layouts_upscale_x2(models, tmp_path):
    old_path = models / "upscale_models" / demo.DEMO_UPSCALER
    old = load_upscale_model_file(old_path, use_cache=False)
    assert old.scale == 2 and old.model.nf == 8 and old.model.nb == 1
    new_path = tmp_path / "upscale_models" / "basicsr.safetensors"
    new_path.parent.mkdir()
    save_file(_to_new_layout(read_state_dict(old_path)), str(new_path))
    new = load_upscale_model_file(new_path, use_cache=False)
    image = torch.rand(1, 16, 16, 3)
    a, b = upscale_image(old, image), upscale_image(new, image)
    assert a.shape == (1, 32, 32, 3) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    nearest = image.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert (a - nearest).abs().mean() < 0.1  # the demo upscaler is near a nearest-neighbour upscale


def test_esrgan_tiled_matches_untiled(models):
    model = load_upscale_model_file(models / "upscale_models" / demo.DEMO_UPSCALER)
    image = torch.rand(2, 40, 56, 3)
    whole = upscale_image(model, image)
    tiled = upscale_image(model, image, tile=24, overlap=12)
    assert tiled.shape == whole.shape == (2, 80, 112, 3)
    assert (tiled - whole).abs().mean() < 2e-3 and (tiled - whole).abs().max() < 0.05


@pytest.mark.parametrize(("upsamples", "unshuffle", "scale"), [(2, 1, 4), (2, 2, 2), (2, 4, 1), (3, 1, 8)])
def test_esrgan_scale_inferred_from_weights(upsamples, unshuffle, scale):
    from airflow_comfy.runner.models.esrgan import RRDBNet, build_rrdbnet

    net = RRDBNet(in_nc=3 * unshuffle ** 2, out_nc=3, nf=8, nb=2, gc=4, upsamples=upsamples, unshuffle=unshuffle)
    rebuilt = build_rrdbnet(net.state_dict())
    assert (rebuilt.nb, rebuilt.gc, rebuilt.scale, rebuilt.unshuffle) == (2, 4, scale, unshuffle)
    with torch.no_grad():
        assert rebuilt(torch.rand(1, 3, 12, 12)).shape == (1, 3, 12 * scale, 12 * scale)


# --- model files ------------------------------------------------------------------------------------------------


def test_names_cannot_escape_their_folder(models, tmp_path):
    for name in ("../checkpoints/" + CKPT, "/etc/passwd", "a/../../x.safetensors", "C:/x.safetensors"):
        with pytest.raises(ModelFileError):
            resolve_model_file(models, "loras", name)
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    link = models / "loras" / "escape.safetensors"
    os.symlink(outside, link)
    try:
        with pytest.raises(ModelFileError, match="outside the models folder"):
            resolve_model_file(models, "loras", "escape.safetensors")
    finally:
        link.unlink()
    assert resolve_model_file(models, "loras", demo.DEMO_LORA) == models / "loras" / demo.DEMO_LORA
    with pytest.raises(ModelFileError, match="unknown model folder"):
        resolve_model_file(models, "secrets", "x")


def test_missing_file_lists_available_files(models):
    with pytest.raises(ModelFileError) as info:
        resolve_model_file(models, "checkpoints", "sd_xl_base_1.0.safetensors")
    message = str(info.value)
    assert "checkpoints" in message and "sd_xl_base_1.0.safetensors" in message and CKPT in message


def test_pickle_files_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "checkpoints" / "old.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert resolve_model_file(tmp_path, "checkpoints", "old.ckpt") == path
    with pytest.raises(ModelFileError, match=r"checkpoints/old.ckpt: refusing to load a pickle"):
        read_state_dict(path)
    assert torch.equal(read_state_dict(path, allow_pickle=True)["w"], torch.ones(2))
    with pytest.raises(ModelFileError, match="pickle"):
        load_checkpoint_file(path)


def test_corrupt_safetensors_is_named(tmp_path):
    path = tmp_path / "loras" / "broken.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match=r"loras/broken.safetensors: not a valid safetensors file"):
        read_state_dict(path)
    truncated = tmp_path / "loras" / "cut.safetensors"
    save_file({"w": torch.ones(64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-16])
    with pytest.raises(ModelFileError, match="cut.safetensors"):
        read_state_dict(truncated)


def test_sha256_of_is_cached_and_tracks_changes(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"abc")
    assert sha256_of(path) == hashlib.sha256(b"abc").hexdigest()
    assert sha256_of(path) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1, 1))
    assert sha256_of(path) == hashlib.sha256(b"abcd").hexdigest()
