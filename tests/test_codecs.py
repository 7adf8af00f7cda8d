"""Boundary value codecs: bit-exact round trips for every serializable type, clear refusals, corrupt bytes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import torch
from safetensors.torch import save

from airflow_comfy.artifacts.errors import BadArtifact
from airflow_comfy.artifacts.manifest import GroupManifest, OutputRecord
from airflow_comfy.runner.codecs import (
    ControlRecipe,
    content_type_for,
    decode_value,
    encode_value,
    extension_for,
    resolve_controls,
)
from airflow_comfy.runner.values import CondEntry, ControlNet, ControlRef, Latent, Recipe


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def special(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Random values plus the ones that a value comparison would hide: -0.0, NaN, inf, subnormals."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator).to(dtype).reshape(-1)
    tensor[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-40]).to(dtype)
    return tensor.reshape(shape)


def round_trip(type_name: str, value: Any, **options: Any) -> tuple[Any, bytes, dict[str, Any]]:
    data, info = encode_value(type_name, value)
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    decoded = decode_value(type_name, data, sha256=info["sha256"], **options)
    return decoded, data, info


def assert_entries_equal(decoded: list[CondEntry], original: list[CondEntry]) -> None:
    assert len(decoded) == len(original)
    for got, want in zip(decoded, original, strict=True):
        assert_same(got.cond, want.cond)
        assert (got.pooled_output is None) == (want.pooled_output is None)
        if want.pooled_output is not None:
            assert_same(got.pooled_output, want.pooled_output)
        assert got.area == want.area and got.strength == want.strength
        assert type(got.strength) is type(want.strength)
        assert got.set_area_to_bounds == want.set_area_to_bounds
        assert got.control_apply_to_uncond == want.control_apply_to_uncond
        assert_extra_equal(got.extra, want.extra)


def assert_extra_equal(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert_same(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_extra_equal(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_extra_equal(g, w)
    else:
        assert got == want


# --- tensors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_image_round_trip_is_bit_exact(dtype: torch.dtype):
    image = special((2, 16, 24, 3), dtype)
    decoded, data, info = round_trip("IMAGE", image)
    assert_same(decoded, image)
    assert info["shape"] == [2, 16, 24, 3] and info["dtype"] == str(dtype).removeprefix("torch.")
    assert encode_value("IMAGE", image)[0] == data  # deterministic


def test_non_contiguous_and_mask_round_trips():
    channels_first = special((1, 3, 8, 8))
    image = channels_first.permute(0, 2, 3, 1)  # a non-contiguous view
    assert not image.is_contiguous()
    assert_same(round_trip("IMAGE", image)[0], image.contiguous())
    for mask in (special((2, 8, 8)), special((8, 8)), torch.zeros(0, 8, 8)):
        decoded, _, info = round_trip("MASK", mask)
        assert_same(decoded, mask)
        assert info["shape"] == list(mask.shape)


def test_latent_round_trips():
    plain = Latent(samples=special((1, 4, 8, 8)))
    decoded, _, info = round_trip("LATENT", plain)
    assert_same(decoded.samples, plain.samples)
    assert decoded.noise_mask is None and decoded.batch_index is None
    assert info["meta"] == {"noise_mask": False, "batch_index": None} and info["shape"] == [1, 4, 8, 8]

    samples = special((3, 4, 8, 8), torch.float16, seed=1)
    masked = Latent(samples=samples, noise_mask=special((3, 1, 64, 64), seed=2), batch_index=[5, 0, 7])
    decoded, _, info = round_trip("LATENT", masked)
    assert_same(decoded.samples, samples)
    assert_same(decoded.noise_mask, masked.noise_mask)
    assert decoded.batch_index == [5, 0, 7]
    assert info["meta"] == {"noise_mask": True, "batch_index": [5, 0, 7]} and info["dtype"] == "float16"

    shared = Latent(samples=samples, noise_mask=samples[:, :1])  # a view of the samples: shared memory
    decoded, _, _ = round_trip("LATENT", shared)
    assert_same(decoded.noise_mask, samples[:, :1].contiguous())
    assert_same(decoded.samples, samples)


# --- conditioning ---------------------------------------------------------------------------------------------


def control_chain() -> tuple[ControlRef, ControlNet, ControlNet]:
    canny = ControlNet(model=torch.nn.Linear(4, 4), recipe=Recipe("ControlNetLoader", "canny.safetensors"))
    depth = ControlNet(model=torch.nn.Linear(4, 4), kind="t2i_adapter",
                       recipe=Recipe("ControlNetLoader", "depth.safetensors",
                                     patches=(("lora", "cn-lora.safetensors", 0.5, 0.25),)))
    first = ControlRef(control_net=canny, hint=special((1, 32, 32, 3), seed=3), strength=0.8, end_percent=0.9)
    second = ControlRef(control_net=depth, hint=special((1, 32, 32, 3), seed=4), strength=0.55,
                        start_percent=0.1, end_percent=1.0, previous=first)
    return second, canny, depth


def sample_conditioning() -> list[CondEntry]:
    cond = special((1, 77, 32), seed=5)
    chain, _, _ = control_chain()
    sdxl = {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}
    return [
        CondEntry(cond=cond),  # SD 1.x text embedding
        CondEntry(cond=special((1, 77, 32), seed=6), area=(64, 48, 8, 16), strength=0.75, set_area_to_bounds=True),
        CondEntry(cond=special((1, 77, 64), torch.float16, seed=7), pooled_output=special((1, 40), seed=8),
                  extra=sdxl),  # SDXL: pooled output + size conditioning
        CondEntry(cond=cond, control=chain, control_apply_to_uncond=True, strength=2,  # same cond tensor again
                  extra={"concat_latent_image": special((1, 4, 8, 8), seed=9), "mask_strength": 0.5,
                         "nested": {"t": (1, "two", None), "__tensor__": "not a tensor tag"}, "lst": [1.5, True]}),
        CondEntry(cond=special((1, 1, 32), seed=10), control=chain),  # the same chain object on a second entry
    ]


def test_conditioning_round_trip_without_loading_controls():
    conditioning = sample_conditioning()
    decoded, data, info = round_trip("CONDITIONING", conditioning)
    assert_entries_equal(decoded, conditioning)
    assert info["meta"]["entries"] == 5 and info["meta"]["controls"] == 2
    assert info["shape"] == [1, 77, 32] and info["meta"]["cond_shapes"][2] == [1, 77, 64]
    assert decoded[0].cond is decoded[3].cond  # stored once, shared again

    control = decoded[3].control
    assert isinstance(control, ControlRecipe) and decoded[4].control is control
    original = conditioning[3].control
    assert control.recipe == original.control_net.recipe and control.kind == "t2i_adapter"
    assert control.recipe.patches == (("lora", "cn-lora.safetensors", 0.5, 0.25),)
    assert (control.strength, control.start_percent, control.end_percent) == (0.55, 0.1, 1.0)
    assert_same(control.hint, original.hint)
    previous = control.previous
    assert isinstance(previous, ControlRecipe) and previous.previous is None
    assert previous.recipe == Recipe("ControlNetLoader", "canny.safetensors") and previous.kind == "controlnet"
    assert (previous.strength, previous.start_percent, previous.end_percent) == (0.8, 0.0, 0.9)
    assert_same(previous.hint, original.previous.hint)

    metadata = _metadata(data)
    assert metadata["type"] == "CONDITIONING" and metadata["count"] == "5"
    assert json.loads(metadata["entries"])[1]["area"] == [64, 48, 8, 16]
    tensors = _tensor_names(data)
    assert {"cond.0", "cond.1", "cond.2", "pooled.2", "control.3.0.hint", "control.3.1.hint"} <= tensors
    assert "cond.3" not in tensors and not any(name.startswith("control.4.") for name in tensors)
    assert encode_value("CONDITIONING", decoded)[0] == data  # decoded placeholders re-encode to the same bytes


def test_conditioning_controls_are_rematerialized_from_their_recipes():
    conditioning = sample_conditioning()
    _, canny, depth = control_chain()
    loaded: list[Recipe] = []

    def load_control_net(recipe: Recipe) -> ControlNet:
        loaded.append(recipe)
        model = torch.nn.Linear(4, 4)
        return ControlNet(model=model, recipe=recipe, kind="t2i_adapter" if "depth" in recipe.file else "controlnet")

    decoded, data, _ = round_trip("CONDITIONING", conditioning, load_control_net=load_control_net)
    assert sorted(loaded, key=lambda r: r.file) == [canny.recipe, depth.recipe]  # each distinct recipe once
    control = decoded[3].control
    assert isinstance(control, ControlRef) and decoded[4].control is control
    assert control.control_net.recipe == depth.recipe and isinstance(control.control_net.model, torch.nn.Linear)
    assert isinstance(control.previous, ControlRef) and control.previous.control_net.recipe == canny.recipe
    assert control.previous.previous is None and control.strength == 0.55
    assert_same(control.previous.hint, conditioning[3].control.previous.hint)
    assert_entries_equal(decoded, conditioning)
    assert encode_value("CONDITIONING", decoded)[0] == data

    loaded.clear()
    placeholders = decode_value("CONDITIONING", data)
    resolved = resolve_controls(placeholders, load_control_net)
    assert len(loaded) == 2 and isinstance(resolved[4].control, ControlRef)
    assert isinstance(placeholders[4].control, ControlRecipe)  # resolve_controls returns new entries


def test_empty_conditioning():
    decoded, _, info = round_trip("CONDITIONING", [])
    assert decoded == [] and info["shape"] is None and info["meta"]["entries"] == 0


# --- scalars --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("type_name", "value"), [
    ("INT", 0), ("INT", -7), ("INT", 2**64 - 1), ("FLOAT", 0.1), ("FLOAT", -0.0), ("FLOAT", 5e-324),
    ("FLOAT", 1e308), ("STRING", ""), ("STRING", "a photo of a café {{ ds }} \n\u2603"), ("BOOLEAN", True),
    ("BOOLEAN", False),
])
def test_scalar_round_trips(type_name: str, value: Any):
    decoded, data, info = round_trip(type_name, value)
    assert type(decoded) is type(value) and decoded == value
    if type_name == "FLOAT":
        assert decoded.hex() == value.hex()
    assert json.loads(data)["type"] == type_name and info["shape"] is None
    assert extension_for(type_name) == "json" and content_type_for(type_name) == "application/json"


def test_float_accepts_ints():
    assert round_trip("FLOAT", 3)[0] == 3.0 and isinstance(round_trip("FLOAT", 3)[0], float)


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("type_name", "value", "message"), [
    ("INT", True, "expected an int"),
    ("INT", 1.5, "expected an int"),
    ("INT", "3", "expected an int"),
    ("FLOAT", "0.5", "expected a float"),
    ("FLOAT", False, "expected a float"),
    ("STRING", 3, "expected a str"),
    ("BOOLEAN", 1, "expected a bool"),
    ("IMAGE", [[0.0]], "expected a torch.Tensor"),
    ("IMAGE", torch.zeros(8, 8, 3), "3-D tensor as IMAGE"),
    ("MASK", torch.zeros(1, 1, 8, 8), "4-D tensor as MASK"),
    ("LATENT", torch.zeros(1, 4, 8, 8), "expected a runner.values.Latent"),
    ("LATENT", Latent(samples=torch.zeros(1, 4, 8, 8), batch_index=[0.5]), "batch_index"),
    ("LATENT", Latent(samples=[0.0]), "expected a torch.Tensor"),
    ("CONDITIONING", CondEntry(cond=torch.zeros(1, 2, 3)), "expected a list"),
    ("CONDITIONING", [torch.zeros(1, 2, 3)], "expected a list of runner.values.CondEntry"),
    ("CONDITIONING", [CondEntry(cond=torch.zeros(1, 2, 3), extra={"f": object()})], "cannot serialize a object"),
    ("CONDITIONING", [CondEntry(cond=torch.zeros(1, 2, 3), extra={1: 2})], "string keys"),
    ("CONDITIONING", [CondEntry(cond=torch.zeros(1, 2, 3), control="canny")], "expected ControlRef"),
])
def test_wrong_values_are_refused(type_name: str, value: Any, message: str):
    with pytest.raises(TypeError, match=message):
        encode_value(type_name, value)


@pytest.mark.parametrize("type_name", ["MODEL", "CLIP", "VAE", "CONTROL_NET", "UPSCALE_MODEL"])
def test_model_types_never_cross_a_boundary(type_name: str):
    with pytest.raises(ValueError, match="never crosses a group boundary.*recipe"):
        encode_value(type_name, object())
    with pytest.raises(ValueError, match="never crosses"):
        decode_value(type_name, b"")
    with pytest.raises(ValueError, match="never crosses"):
        extension_for(type_name)


def test_unknown_types_are_refused():
    for call in (lambda: encode_value("SIGMAS", 1), lambda: decode_value("latent", b"{}")):
        with pytest.raises(ValueError, match="cannot serialize values of type"):
            call()


# --- corrupt bytes --------------------------------------------------------------------------------------------


def _metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size])["__metadata__"]


def _tensor_names(data: bytes) -> set[str]:
    size = int.from_bytes(data[:8], "little")
    return set(json.loads(data[8:8 + size])) - {"__metadata__"}


def _with_metadata(data: bytes, **changes: str) -> bytes:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + size:]


def _corruptions() -> list[tuple[str, bytes, str]]:
    latent, _ = encode_value("LATENT", Latent(samples=special((1, 4, 8, 8)), noise_mask=torch.ones(1, 1, 8, 8)))
    conditioning, _ = encode_value("CONDITIONING", sample_conditioning())
    flipped = bytearray(latent)
    flipped[10] ^= 0xFF
    return [
        ("empty", b"", "not a safetensors file"),
        ("short", b"\x01\x02", "not a safetensors file"),
        ("truncated", latent[:-5], "corrupt"),
        ("garbage", b"\xff" * 64, "not a safetensors file"),
        ("header", bytes(flipped), "corrupt"),
        ("json", b"{}", "not a safetensors file"),
        ("foreign safetensors", save({"x": torch.zeros(2)}), "no airflow-comfy metadata"),
        ("other format", save({"x": torch.zeros(2)}, metadata={"format": "pt"}), "not an airflow-comfy value"),
        ("newer codec", _with_metadata(latent, codec="9"), "codec version '9'"),
        ("missing tensor", _with_metadata(latent, noise_mask="true", batch_index="[1"), "not a valid LATENT"),
        ("bad entries", _with_metadata(conditioning, entries="[{}]", count="1"), "not a valid CONDITIONING"),
        ("bad count", _with_metadata(conditioning, count="7"), "not a valid CONDITIONING"),
        ("bad control id", _with_metadata(conditioning, controls="[]"), "not a valid CONDITIONING"),
    ]


@pytest.mark.parametrize(("name", "data", "message"), _corruptions(), ids=[c[0] for c in _corruptions()])
def test_corrupt_bytes_are_bad_artifacts(name: str, data: bytes, message: str):
    type_name = "CONDITIONING" if "CONDITIONING" in message else "LATENT"
    with pytest.raises(BadArtifact, match=message) as raised:
        decode_value(type_name, data, uri="s3://b/runs/x/3/0.safetensors")
    assert raised.value.uri == "s3://b/runs/x/3/0.safetensors"


def test_wrong_type_and_hash_mismatch_are_bad_artifacts():
    image, info = encode_value("IMAGE", special((1, 8, 8, 3)))
    with pytest.raises(BadArtifact, match="holds a IMAGE, expected LATENT"):
        decode_value("LATENT", image)
    with pytest.raises(BadArtifact, match="does not match its manifest"):
        decode_value("IMAGE", image[:-1] + bytes([image[-1] ^ 1]), sha256=info["sha256"])  # flipped tensor bit
    number, _ = encode_value("INT", 3)
    for data, message in [(number, "holds a INT, expected FLOAT"), (b"\xff", "not valid JSON"),
                          (b"[3]", "not an airflow-comfy FLOAT"), (b"{}", "not an airflow-comfy FLOAT"),
                          (json.dumps({"format": "airflow-comfy", "codec": "1", "type": "FLOAT",
                                       "value": "x"}).encode(), "FLOAT value is 'x'"),
                          (json.dumps({"format": "airflow-comfy", "codec": "2", "type": "FLOAT",
                                       "value": 1.0}).encode(), "codec version '2'")]:
        with pytest.raises(BadArtifact, match=message):
            decode_value("FLOAT", data)
    with pytest.raises(BadArtifact, match="holds a MASK, expected IMAGE"):
        decode_value("IMAGE", encode_value("MASK", torch.zeros(1, 2, 2))[0])


def test_info_makes_a_valid_manifest_record():
    records = []
    for i, (type_name, value) in enumerate([("LATENT", Latent(samples=special((1, 4, 8, 8)), batch_index=[0])),
                                            ("CONDITIONING", sample_conditioning()), ("STRING", "hi")]):
        data, info = encode_value(type_name, value)
        records.append(OutputRecord.from_info(str(i), 0, type_name, f"file:///s/{i}/0.{extension_for(type_name)}",
                                              info))
    manifest = GroupManifest("w", "", "g", "d/r", 1, outputs=records)
    assert GroupManifest.from_json(manifest.to_json()) == manifest
    assert records[0].shape == [1, 4, 8, 8] and records[0].meta["batch_index"] == [0]
    assert extension_for("LATENT") == "safetensors" and content_type_for("IMAGE") == "application/octet-stream"
