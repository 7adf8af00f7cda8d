"""Our KL autoencoder (:mod:`airflow_comfy.runner.models.autoencoder`) against diffusers' ``AutoencoderKL`` on the
same weights: the same latents from ``encode(...).latent_dist.mode()`` and the same pixels from
``decode(...).sample``, bit for bit (one thread), for the SD 1.5, SD 2 and SDXL VAE configs, loaded the way a
user's files are (LDM and diffusers-layout VAE files through VAELoader's loader) and built from variant configs.

The VAEs have the real configs' structure (4 blocks, 2 residual blocks each, 32 groups, the mid-block attention)
with narrower widths and random weights with non-trivial norms and biases; diffusers is the reference here only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from airflow_comfy.runner.models import layout
from airflow_comfy.runner.models.autoencoder import Autoencoder
from airflow_comfy.runner.models.building import build_vae
from airflow_comfy.runner.models.config import shipped_config
from airflow_comfy.runner.models.files import ModelFileError
from airflow_comfy.runner.models.vae_file import load_vae_file

FAMILIES = ("sd1", "sd2", "sdxl")
NARROW = [32, 64, 64, 64]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(family: str, **changes) -> dict:
    config = {k: v for k, v in shipped_config(family, "vae").items() if not k.startswith("_")}
    return dict(config, block_out_channels=NARROW, **changes)


def _reference(config: dict, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config).eval()
    with torch.no_grad():
        for tensor in vae.state_dict().values():
            tensor.normal_(0.0, 0.2)
    return vae


def _assert_same_outputs(ours: torch.nn.Module, reference: torch.nn.Module, dtype: torch.dtype) -> None:
    """Batch of 2, sizes that are not powers of two (the encoder's asymmetric pad, the decoder's upsampling)."""
    generator = torch.Generator().manual_seed(1)
    pixels = (torch.rand(2, 3, 40, 56, generator=generator) * 2 - 1).to(dtype)
    latents = (torch.randn(2, 4, 5, 7, generator=generator) * 4).to(dtype)
    ours, reference = ours.to(dtype=dtype), reference.to(dtype=dtype)
    with torch.inference_mode():
        expected_latents = reference.encode(pixels).latent_dist.mode()
        expected_pixels = reference.decode(latents).sample
        got_latents = ours.encode(pixels).latent_dist.mode()
        got_pixels = ours.decode(latents).sample
    assert got_latents.shape == (2, 4, 5, 7) and got_pixels.shape == (2, 3, 40, 56)
    assert got_latents.dtype == expected_latents.dtype == dtype
    assert torch.equal(got_latents, expected_latents)
    assert torch.equal(got_pixels, expected_pixels)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("file_layout", ["ldm", "diffusers"])
def test_a_loaded_vae_file_computes_what_diffusers_computes(family, file_layout, tmp_path: Path, one_thread):
    """The VAE of a user's file (LDM ``first_stage_model.*`` keys, config from the shapes as for a downloaded
    file; or diffusers keys) is our module and gives diffusers' latents and pixels exactly, fp32 and bf16."""
    reference = _reference(_config(family))
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    tensors = layout.vae_to_ldm(state) if file_layout == "ldm" else state
    path = tmp_path / f"{family}-{file_layout}.safetensors"
    save_file(tensors, path)
    loaded = load_vae_file(path, family=family, use_cache=False)
    assert isinstance(loaded.vae, Autoencoder)
    assert loaded.latent_scale == reference.config.scaling_factor
    for dtype in (torch.float32, torch.bfloat16):
        _assert_same_outputs(loaded.vae, reference, dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("changes", [{"mid_block_add_attention": False},
                                     {"use_quant_conv": False, "use_post_quant_conv": False},
                                     {"layers_per_block": 1, "latent_channels": 8}],
                         ids=["no-mid-attention", "no-quant-convs", "one-layer-8-latent-channels"])
def test_config_variants_compute_what_diffusers_computes(family, changes, one_thread):
    config = _config(family, **changes)
    reference = _reference(config, seed=2)
    ours = build_vae(config, reference.state_dict(), label="variant.safetensors")
    assert list(ours.state_dict()) == list(reference.state_dict())  # the same names, in the same order
    if config["latent_channels"] != 4:  # the shared inputs have 4 latent channels
        generator = torch.Generator().manual_seed(1)
        latents = torch.randn(1, config["latent_channels"], 5, 7, generator=generator)
        with torch.inference_mode():
            assert torch.equal(ours.decode(latents).sample, reference.decode(latents).sample)
        return
    _assert_same_outputs(ours, reference, torch.float32)


def test_a_vae_config_we_do_not_build_is_refused_naming_the_file():
    config = _config("sd1", down_block_types=["AttnDownEncoderBlock2D"] * 4)
    with pytest.raises(ModelFileError, match=r"odd-vae\.safetensors: .*down_block_types .*AttnDownEncoderBlock2D"):
        build_vae(config, {}, label="odd-vae.safetensors")
    with pytest.raises(ModelFileError, match=r"odd-vae\.safetensors: .*act_fn 'gelu'"):
        build_vae(_config("sd1", act_fn="gelu"), {}, label="odd-vae.safetensors")
