"""Boundary values <-> bytes, bit-exact (what one group writes and the next one reads).

* ``IMAGE`` / ``MASK`` / ``LATENT`` / ``CONDITIONING``: one safetensors blob each. Plain metadata lives in the
  safetensors ``__metadata__`` (strings only): ``format``, ``codec`` (version) and ``type`` always; for a
  LATENT ``noise_mask`` (``"true"``/``"false"``) and ``batch_index`` (JSON); for a CONDITIONING ``entries``
  (JSON: per entry the tensor names, area, strength, flags, extras, control id) and ``controls`` (JSON: each
  distinct ControlNet application of the entries' chains as its *recipe*: loader, file and patches of the
  ControlNet, its kind, hint tensor name, strength, start/end percent, previous control id).

  Tensors: ``image``, ``mask``, ``samples``, ``noise_mask``, ``cond.<i>``, ``pooled.<i>``,
  ``control.<i>.<depth>.hint`` (entry ``i``, depth 0 = the last applied), ``extra.<i>.<path>`` (tensors in an
  entry's extras). A tensor object used twice (a hint shared by the positive and negative conditioning, the
  same ControlNet chain on several entries) is stored once, and decoding shares it again.

* ``INT`` / ``FLOAT`` / ``STRING`` / ``BOOLEAN``: a small JSON document ``{"format", "codec", "type", "value"}``.

A ControlNet's weights never cross a boundary: :func:`decode_value` returns a :class:`ControlRecipe` where the
``ControlRef`` was, unless given ``load_control_net`` (``Recipe -> ControlNet``), which re-materializes each
distinct recipe once (see also :func:`resolve_controls`).

Errors: an unknown or model-like type name -> ``ValueError``; a value of the wrong kind -> ``TypeError``;
bytes that are corrupt or hold another type -> :class:`~airflow_comfy.artifacts.errors.BadArtifact`.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.errors import BadArtifact
from airflow_comfy.runner.values import CondEntry, Conditioning, ControlNet, ControlRef, Latent, Recipe

FORMAT = "airflow-comfy"
CODEC_VERSION = "1"
TENSOR_TYPES = ("IMAGE", "MASK", "LATENT", "CONDITIONING")
SCALAR_TYPES = layout.SCALAR_TYPES
SERIALIZABLE_TYPES = TENSOR_TYPES + SCALAR_TYPES
MODEL_TYPES = ("MODEL", "CLIP", "VAE", "CONTROL_NET", "UPSCALE_MODEL", "CLIP_VISION", "STYLE_MODEL", "GLIGEN")

LoadControlNet = Callable[[Recipe], ControlNet]


@dataclass
class ControlRecipe:
    """A decoded ControlRef whose ControlNet is not loaded yet: its recipe, hint and strengths."""

    recipe: Recipe
    hint: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlRecipe | ControlRef | None = None
    kind: str = "controlnet"


# --- public API -----------------------------------------------------------------------------------------------


def extension_for(type_name: str) -> str:
    """File extension of an encoded value: ``safetensors`` or ``json`` (``ValueError`` for other types)."""
    return layout.extension_for(_check_type(type_name))


def content_type_for(type_name: str) -> str:
    return "application/json" if _check_type(type_name) in SCALAR_TYPES else "application/octet-stream"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_value(type_name: str, value: Any) -> tuple[bytes, dict[str, Any]]:
    """``value`` of ComfyUI type ``type_name`` -> ``(bytes, info)``; ``info`` has ``sha256``, ``bytes``,
    ``shape``, ``dtype`` and ``meta`` (what a manifest's output record needs)."""
    type_name = _check_type(type_name)
    if type_name in SCALAR_TYPES:
        data, info = _encode_scalar(type_name, value), {"shape": None, "dtype": None, "meta": {}}
    else:
        tensors, metadata, info = _ENCODERS[type_name](value)
        metadata = {"format": FORMAT, "codec": CODEC_VERSION, "type": type_name, **metadata}
        data = _save(tensors.tensors, metadata)
    return data, {"sha256": sha256_hex(data), "bytes": len(data), **info}


def decode_value(type_name: str, data: bytes, *, load_control_net: LoadControlNet | None = None,
                 uri: str | None = None, sha256: str | None = None) -> Any:
    """Bytes from :func:`encode_value` -> the value.

    ``sha256`` (from the manifest) is checked first when given; ``uri`` only names the object in errors."""
    type_name = _check_type(type_name)
    where = uri or f"{type_name} artifact"
    if sha256 is not None and sha256_hex(data) != sha256:
        raise BadArtifact(f"{where} does not match its manifest (sha256 {sha256_hex(data)}, expected {sha256})",
                          uri=uri)
    if type_name in SCALAR_TYPES:
        return _decode_scalar(type_name, data, where, uri)
    tensors, metadata = _load(data, where, uri)
    found = metadata.get("type")
    if found != type_name:
        raise BadArtifact(f"{where} holds a {found or 'value of unknown type'}, expected {type_name}", uri=uri)
    try:
        value = _DECODERS[type_name](tensors, metadata)
    except BadArtifact:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise BadArtifact(f"{where} is not a valid {type_name} artifact: {type(err).__name__}: {err}",
                          uri=uri) from None
    if type_name == "CONDITIONING" and load_control_net is not None:
        value = resolve_controls(value, load_control_net)
    return value


def resolve_controls(conditioning: Conditioning, load_control_net: LoadControlNet) -> Conditioning:
    """Replace every :class:`ControlRecipe` in the entries' control chains by a ``ControlRef`` whose ControlNet
    ``load_control_net`` made; each distinct recipe is loaded once, shared chains stay shared."""
    refs: dict[int, ControlRef] = {}
    models: dict[str, ControlNet] = {}

    def resolve(control: ControlRecipe | ControlRef | None) -> ControlRef | None:
        if control is None or isinstance(control, ControlRef):
            return control
        if id(control) not in refs:
            key = json.dumps(_recipe_json(control.recipe), sort_keys=True)
            if key not in models:
                models[key] = load_control_net(control.recipe)
            refs[id(control)] = ControlRef(control_net=models[key], hint=control.hint, strength=control.strength,
                                           start_percent=control.start_percent, end_percent=control.end_percent,
                                           previous=resolve(control.previous))
        return refs[id(control)]

    return [replace(entry, control=resolve(entry.control)) for entry in conditioning]


# --- types ----------------------------------------------------------------------------------------------------


def _check_type(type_name: str) -> str:
    if type_name in SERIALIZABLE_TYPES:
        return type_name
    if type_name in MODEL_TYPES:
        raise ValueError(f"{type_name} never crosses a group boundary: the consuming group re-materializes it "
                         "from its recipe (loader node and patches)")
    raise ValueError(f"cannot serialize values of type {type_name!r}; serializable types: "
                     f"{', '.join(SERIALIZABLE_TYPES)}")


def _expect(value: Any, kind: type | tuple[type, ...], type_name: str, what: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"cannot encode {type(value).__name__} as {type_name}: expected {what}")


# --- scalars --------------------------------------------------------------------------------------------------


def _scalar(type_name: str, value: Any) -> Any:
    if type_name == "INT":
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"cannot encode {type(value).__name__} as INT: expected an int")
        return operator.index(value)
    if type_name == "FLOAT":
        if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(f"cannot encode {type(value).__name__} as FLOAT: expected a float")
        return float(value)
    if type_name == "STRING":
        _expect(value, str, "STRING", "a str")
        return value
    _expect(value, bool, "BOOLEAN", "a bool")
    return bool(value)


def _encode_scalar(type_name: str, value: Any) -> bytes:
    document = {"format": FORMAT, "codec": CODEC_VERSION, "type": type_name, "value": _scalar(type_name, value)}
    return json.dumps(document, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _decode_scalar(type_name: str, data: bytes, where: str, uri: str | None) -> Any:
    try:
        document = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadArtifact(f"{where} is not valid JSON: {err}", uri=uri) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or "value" not in document:
        raise BadArtifact(f"{where} is not an airflow-comfy {type_name} value", uri=uri)
    _check_codec(document.get("codec"), where, uri)
    if document.get("type") != type_name:
        raise BadArtifact(f"{where} holds a {document.get('type')}, expected {type_name}", uri=uri)
    value = document["value"]
    kinds = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[type_name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and type_name != "BOOLEAN"):
        raise BadArtifact(f"{where}: {type_name} value is {value!r}", uri=uri)
    return float(value) if type_name == "FLOAT" else value


def _check_codec(version: Any, where: str, uri: str | None) -> None:
    if version != CODEC_VERSION:
        raise BadArtifact(f"{where} was written by codec version {version!r}; this runner reads {CODEC_VERSION} "
                          "(use the same airflow-comfy version in every group)", uri=uri)


# --- safetensors container ------------------------------------------------------------------------------------


class _Tensors:
    """Tensors to save, by name. The same tensor object is stored once; tensors that share memory with an
    already stored one (views) are copied, as safetensors refuses shared storage."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}
        self._storages: set[int] = set()
        self._keep: list[torch.Tensor] = []

    def add(self, name: str, tensor: Any) -> str:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if id(tensor) in self._names:
            return self._names[id(tensor)]
        while name in self.tensors:
            name += "_"
        packed = tensor.detach().to("cpu").contiguous()
        storage = packed.untyped_storage().data_ptr()
        if storage and storage in self._storages:
            packed = packed.clone()
            storage = packed.untyped_storage().data_ptr()
        self._storages.add(storage)
        self._keep.append(tensor)  # ids stay unique while we encode
        self._names[id(tensor)] = name
        self.tensors[name] = packed
        return name


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header: safetensors writes ``__metadata__`` in hash-map order, which
    differs from one process to the next; sorting the header's keys makes equal values give equal bytes (and
    equal sha256). Data offsets are relative to the end of the header, so the data is untouched."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def _load(data: bytes, where: str, uri: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    data = bytes(data)
    metadata = _header_metadata(data, where, uri)
    if metadata.get("format") != FORMAT:
        raise BadArtifact(f"{where} is a safetensors file but not an airflow-comfy value", uri=uri)
    _check_codec(metadata.get("codec"), where, uri)
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on corrupt data
        raise BadArtifact(f"{where} is corrupt: {err}", uri=uri) from None
    return tensors, metadata


def _header_metadata(data: bytes, where: str, uri: str | None) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob: 8-byte little-endian header size, then a JSON header."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size < 2 or size > len(data) - 8:
        raise BadArtifact(f"{where} is not a safetensors file (bad header, {len(data)} bytes)", uri=uri)
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadArtifact(f"{where} is corrupt: its safetensors header is not JSON", uri=uri) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise BadArtifact(f"{where} carries no airflow-comfy metadata", uri=uri)
    return metadata


def _info(tensor: torch.Tensor, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "meta": meta or {}}


def _json(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


def _tensor(tensors: dict[str, torch.Tensor], name: Any) -> torch.Tensor:
    if not isinstance(name, str) or name not in tensors:
        raise KeyError(f"tensor {name!r} is missing")
    return tensors[name]


# --- IMAGE / MASK ---------------------------------------------------------------------------------------------


def _encode_image(value: Any) -> tuple[_Tensors, dict[str, str], dict[str, Any]]:
    _expect(value, torch.Tensor, "IMAGE", "a torch.Tensor [B, H, W, C]")
    if value.ndim != 4:
        raise TypeError(f"cannot encode a {value.ndim}-D tensor as IMAGE: expected [B, H, W, C]")
    tensors = _Tensors()
    tensors.add("image", value)
    return tensors, {}, _info(value)


def _encode_mask(value: Any) -> tuple[_Tensors, dict[str, str], dict[str, Any]]:
    _expect(value, torch.Tensor, "MASK", "a torch.Tensor [B, H, W]")
    if value.ndim not in (2, 3):
        raise TypeError(f"cannot encode a {value.ndim}-D tensor as MASK: expected [B, H, W] or [H, W]")
    tensors = _Tensors()
    tensors.add("mask", value)
    return tensors, {}, _info(value)


def _decode_image(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> torch.Tensor:
    image = _tensor(tensors, "image")
    if image.ndim != 4:
        raise ValueError(f"IMAGE tensor has {image.ndim} dimensions, expected 4")
    return image


def _decode_mask(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> torch.Tensor:
    mask = _tensor(tensors, "mask")
    if mask.ndim not in (2, 3):
        raise ValueError(f"MASK tensor has {mask.ndim} dimensions, expected 2 or 3")
    return mask


# --- LATENT ---------------------------------------------------------------------------------------------------


def _encode_latent(value: Any) -> tuple[_Tensors, dict[str, str], dict[str, Any]]:
    _expect(value, Latent, "LATENT", "a runner.values.Latent")
    tensors = _Tensors()
    tensors.add("samples", value.samples)
    if value.noise_mask is not None:
        tensors.add("noise_mask", value.noise_mask)
    batch_index = value.batch_index
    if batch_index is not None:
        if not isinstance(batch_index, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in batch_index):
            raise TypeError(f"LATENT batch_index must be a list of ints, got {batch_index!r}")
        batch_index = list(batch_index)
    metadata = {"noise_mask": json.dumps(value.noise_mask is not None), "batch_index": json.dumps(batch_index)}
    meta = {"noise_mask": value.noise_mask is not None, "batch_index": batch_index}
    return tensors, metadata, _info(value.samples, meta)


def _decode_latent(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Latent:
    has_mask = _json(metadata.get("noise_mask"), False)
    batch_index = _json(metadata.get("batch_index"))
    if batch_index is not None and (not isinstance(batch_index, list)
                                    or not all(isinstance(i, int) for i in batch_index)):
        raise ValueError(f"batch_index is {batch_index!r}")
    noise_mask = _tensor(tensors, "noise_mask") if has_mask else None
    return Latent(samples=_tensor(tensors, "samples"), noise_mask=noise_mask, batch_index=batch_index)


# --- CONDITIONING ---------------------------------------------------------------------------------------------

_TENSOR_TAG, _TUPLE_TAG, _DICT_TAG = "__tensor__", "__tuple__", "__dict__"


def _recipe_json(recipe: Any) -> dict[str, Any]:
    if not isinstance(recipe, Recipe):
        raise TypeError(f"a ControlNet's recipe must be a runner.values.Recipe, got {type(recipe).__name__}")
    return {"loader": recipe.loader, "file": recipe.file, "patches": [list(patch) for patch in recipe.patches]}


def _recipe_from_json(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise ValueError(f"recipe is {data!r}")
    patches = tuple(tuple(patch) for patch in data.get("patches", []))
    return Recipe(loader=str(data["loader"]), file=str(data["file"]), patches=patches)


def _encode_extra(value: Any, tensors: _Tensors, path: str) -> Any:
    """JSON form of an entry's extras; tensors become ``{"__tensor__": name}``, tuples ``{"__tuple__": [...]}``."""
    if isinstance(value, torch.Tensor):
        return {_TENSOR_TAG: tensors.add(path, value)}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode_extra(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]
        return {_TUPLE_TAG: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{path}: CONDITIONING extras need string keys, got {list(value)!r}")
        encoded = {key: _encode_extra(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {_DICT_TAG: encoded} if set(value) & {_TENSOR_TAG, _TUPLE_TAG, _DICT_TAG} else encoded
    raise TypeError(f"{path}: cannot serialize a {type(value).__name__} in CONDITIONING extras")


def _decode_extra(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode_extra(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR_TAG}:
        return _tensor(tensors, value[_TENSOR_TAG])
    if set(value) == {_TUPLE_TAG}:
        return tuple(_decode_extra(item, tensors) for item in value[_TUPLE_TAG])
    if set(value) == {_DICT_TAG}:
        value = value[_DICT_TAG]
    return {key: _decode_extra(item, tensors) for key, item in value.items()}


class _ControlTable:
    """Distinct controls of all entries' chains, each once, a control's ``previous`` before it."""

    def __init__(self, tensors: _Tensors) -> None:
        self.tensors = tensors
        self.records: list[dict[str, Any]] = []
        self._ids: dict[int, int] = {}
        self._open: set[int] = set()

    def add(self, control: Any, entry: int, depth: int = 0) -> int:
        if id(control) in self._ids:
            return self._ids[id(control)]
        if id(control) in self._open:
            raise ValueError("a ControlRef chain loops back on itself")
        if isinstance(control, ControlRef):
            _expect(control.control_net, ControlNet, "CONDITIONING", "a ControlRef whose control_net is a ControlNet")
            recipe, kind = control.control_net.recipe, control.control_net.kind
        elif isinstance(control, ControlRecipe):
            recipe, kind = control.recipe, control.kind
        else:
            raise TypeError(f"cannot encode a {type(control).__name__} as a CONDITIONING control: expected ControlRef")
        self._open.add(id(control))
        previous = None if control.previous is None else self.add(control.previous, entry, depth + 1)
        self.records.append({
            "recipe": _recipe_json(recipe), "kind": kind,
            "hint": self.tensors.add(f"control.{entry}.{depth}.hint", control.hint),
            "strength": control.strength, "start_percent": control.start_percent,
            "end_percent": control.end_percent, "previous": previous,
        })
        self._ids[id(control)] = len(self.records) - 1
        return self._ids[id(control)]


def _encode_entry(i: int, entry: Any, tensors: _Tensors, controls: _ControlTable) -> dict[str, Any]:
    _expect(entry, CondEntry, "CONDITIONING", "a list of runner.values.CondEntry")
    return {
        "cond": tensors.add(f"cond.{i}", entry.cond),
        "pooled": None if entry.pooled_output is None else tensors.add(f"pooled.{i}", entry.pooled_output),
        "area": None if entry.area is None else list(entry.area),
        "strength": entry.strength,
        "set_area_to_bounds": entry.set_area_to_bounds,
        "control": None if entry.control is None else controls.add(entry.control, i),
        "control_apply_to_uncond": entry.control_apply_to_uncond,
        "extra": _encode_extra(entry.extra, tensors, f"extra.{i}"),
    }


def _encode_conditioning(value: Any) -> tuple[_Tensors, dict[str, str], dict[str, Any]]:
    _expect(value, (list, tuple), "CONDITIONING", "a list of runner.values.CondEntry")
    tensors = _Tensors()
    controls = _ControlTable(tensors)
    entries = [_encode_entry(i, entry, tensors, controls) for i, entry in enumerate(value)]
    metadata = {"count": str(len(entries)), "entries": json.dumps(entries), "controls": json.dumps(controls.records)}
    first = value[0].cond if value else None
    meta = {"entries": len(entries), "controls": len(controls.records),
            "cond_shapes": [list(entry.cond.shape) for entry in value]}
    info = _info(first, meta) if first is not None else {"shape": None, "dtype": None, "meta": meta}
    return tensors, metadata, info


def _decode_controls(records: Any, tensors: dict[str, torch.Tensor]) -> list[ControlRecipe]:
    if not isinstance(records, list):
        raise ValueError("controls is not a list")
    controls: list[ControlRecipe] = []
    for i, record in enumerate(records):
        previous = record["previous"]
        if previous is not None and not (isinstance(previous, int) and 0 <= previous < i):
            raise ValueError(f"control {i} names previous control {previous!r}")
        controls.append(ControlRecipe(
            recipe=_recipe_from_json(record["recipe"]), hint=_tensor(tensors, record["hint"]),
            strength=record["strength"], start_percent=record["start_percent"],
            end_percent=record["end_percent"], previous=None if previous is None else controls[previous],
            kind=record.get("kind", "controlnet"),
        ))
    return controls


def _decode_entry(record: dict[str, Any], tensors: dict[str, torch.Tensor],
                  controls: list[ControlRecipe]) -> CondEntry:
    control = record["control"]
    if control is not None and not (isinstance(control, int) and 0 <= control < len(controls)):
        raise ValueError(f"entry names control {control!r}")
    return CondEntry(
        cond=_tensor(tensors, record["cond"]),
        pooled_output=None if record["pooled"] is None else _tensor(tensors, record["pooled"]),
        area=None if record["area"] is None else tuple(record["area"]),
        strength=record["strength"],
        set_area_to_bounds=bool(record["set_area_to_bounds"]),
        control=None if control is None else controls[control],  # type: ignore[arg-type]  # resolved later
        control_apply_to_uncond=bool(record["control_apply_to_uncond"]),
        extra=_decode_extra(record["extra"], tensors),
    )


def _decode_conditioning(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Conditioning:
    controls = _decode_controls(_json(metadata.get("controls"), []), tensors)
    records = _json(metadata["entries"])
    if not isinstance(records, list) or str(len(records)) != metadata.get("count"):
        raise ValueError(f"entries do not match count {metadata.get('count')!r}")
    return [_decode_entry(record, tensors, controls) for record in records]


_ENCODERS: dict[str, Callable[[Any], tuple[_Tensors, dict[str, str], dict[str, Any]]]] = {
    "IMAGE": _encode_image, "MASK": _encode_mask, "LATENT": _encode_latent, "CONDITIONING": _encode_conditioning,
}
_DECODERS: dict[str, Callable[[dict[str, torch.Tensor], dict[str, str]], Any]] = {
    "IMAGE": _decode_image, "MASK": _decode_mask, "LATENT": _decode_latent, "CONDITIONING": _decode_conditioning,
}
