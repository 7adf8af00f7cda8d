"""The group manifest: what one group task produced. Written by the runner as the group's last object
(``layout.manifest_key``), returned through XCom, and read by downstream groups to find their inputs.

Shape (version 1)::

    {
      "schema": "airflow-comfy/group-manifest", "version": 1,
      "workflow": {"name": "txt2img", "sha256": "<64 hex>"},
      "group": "inference", "run_key": "txt2img/manual__...", "try": 1,
      "spec_sha256": "<64 hex>", "params": {"seed": 7},
      "outputs": [{"node": "3", "output": 0, "type": "LATENT", "uri": "s3://...", "sha256": "...",
                   "bytes": 16472, "shape": [1, 4, 64, 64], "dtype": "float32", "meta": {}}],
      "images": [{"node": "9", "uri": "...", "filename": "ComfyUI_00001_.png", "subfolder": "",
                  "width": 512, "height": 512, "sha256": "..."}],
      "timings": {"nodes": {"3": 12.5}, "totals": {"total": 14.1}},
      "models": {"checkpoints/sd15.safetensors": "<64 hex>"},
      "inputs": {"s3://bucket/inputs/cat.png": "<64 hex>"},
      "package_version": "0.1.0",
      "low_memory": {"6": {"group": "postprocess", "class_type": "VAEDecode", "error": "OutOfMemoryError: ...",
                           "vae": "decode in tiles", "tile_px": 256, "overlap_px": 64, "tiles": 9, ...}},
      "stats": {"nodes": {"3": {"class_type": "KSampler", "role": "sampling", "seconds": 12.5, "load_s": 0.0,
                                "compute_s": 12.5, "bytes_read": 1544, "bytes_written": 16472}},
                "totals": {"model_load_s": 1.2, "sampling_s": 12.5, "decode_s": 0.4, "compute_s": 12.9,
                           "bytes_in": 1544, "bytes_out": 16472, "image_bytes": 0,
                           "peak_rss_bytes": 2147483648, "peak_cuda_bytes": 4294967296}},
      "manifest_uri": "s3://.../manifest.json"
    }

``low_memory`` lists the nodes that ran out of memory and were retried in low-memory mode (tiled VAE, sliced
attention), so their values may differ slightly from a normal run: this group's, and those its input manifests
list (each entry names its group). Older manifests have none.

``inputs``: the input images read (as the workflow or a param named them: a file name, a ``file://`` or an
``s3://`` URI) and the sha256 of their bytes, this group's and those its input manifests list. Older manifests
have none.

``spec_sha256`` (the group spec's) and ``params`` (the run's values of the params this group binds) say what
committed the group: a later try, or a rerun under the same run key, with the same spec and params returns this
manifest instead of computing again; one with another spec or other params is a run key collision (see
:mod:`airflow_comfy.runner.preflight`). Older manifests have neither.

``stats`` (:mod:`airflow_comfy.runner.run_stats`): per node its seconds split into model load and compute, and
the bytes it read and wrote; group totals of model load, sampling, decode and compute seconds, bytes handed off
in and out, image bytes, peak RSS, and peak CUDA memory when the group ran on CUDA. The operators emit the
group's metrics from it. Older manifests have none (``{}``); readers must not require any key of it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_comfy.artifacts.errors import BadArtifact

SCHEMA = "airflow-comfy/group-manifest"
VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class OutputRecord:
    """One persisted node output (a boundary value)."""

    node: str
    output: int
    type: str
    uri: str
    sha256: str
    bytes: int
    shape: list[int] | None = None
    dtype: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_info(cls, node: str, output: int, type_name: str, uri: str, info: dict[str, Any]) -> OutputRecord:
        """From the ``info`` that ``runner.codecs.encode_value`` returns with the bytes."""
        return cls(node=node, output=output, type=type_name, uri=uri, sha256=info["sha256"], bytes=info["bytes"],
                   shape=info.get("shape"), dtype=info.get("dtype"), meta=dict(info.get("meta") or {}))


@dataclass
class ImageRecord:
    """One image an output node (SaveImage) wrote."""

    node: str
    uri: str
    filename: str
    width: int
    height: int
    sha256: str
    subfolder: str = ""


@dataclass
class Timings:
    nodes: dict[str, float] = field(default_factory=dict)
    """Seconds per node id."""
    totals: dict[str, float] = field(default_factory=dict)
    """Named totals in seconds (e.g. ``total``, ``load``, ``read``, ``write``)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timings:
        """``{"nodes": {...}, "totals": {...}}``; totals may also be given flat: ``{"nodes": {...}, "total": 3.2}``."""
        totals = dict(data.get("totals") or {})
        totals.update({name: value for name, value in data.items() if name not in ("nodes", "totals")})
        return cls(nodes=dict(data.get("nodes") or {}), totals=totals)


@dataclass
class GroupManifest:
    workflow_name: str
    workflow_sha256: str
    group: str
    run_key: str
    try_number: int
    outputs: list[OutputRecord] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    models: dict[str, str] = field(default_factory=dict)
    """Model file (relative to the models folder) -> its sha256."""
    manifest_uri: str = ""
    package_version: str = ""
    low_memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Node id -> how it ran in low-memory mode (``group``, ``class_type``, ``error``, what the mode did)."""
    spec_sha256: str = ""
    """sha256 of the group spec that made it ("" in manifests from before this field)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The run's values of the params this group binds."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Input image (as named) -> sha256 of its bytes: this group's and its upstream groups'."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Per-node and group figures (seconds, bytes, peak memory); ``{}`` in manifests from before this field."""

    def __post_init__(self) -> None:
        if isinstance(self.timings, dict):
            self.timings = Timings.from_dict(self.timings)

    def output(self, node: str, output: int) -> OutputRecord:
        """The record of ``node``'s output ``output``; ``KeyError`` naming the group if it is not here."""
        for record in self.outputs:
            if record.node == node and record.output == output:
                return record
        raise KeyError(f"group {self.group!r} persisted no output {output} of node {node!r} "
                       f"(it has: {[(r.node, r.output) for r in self.outputs]})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "workflow": {"name": self.workflow_name, "sha256": self.workflow_sha256},
            "group": self.group,
            "run_key": self.run_key,
            "try": self.try_number,
            "outputs": [asdict(record) for record in self.outputs],
            "images": [asdict(record) for record in self.images],
            "timings": asdict(self.timings),
            "models": dict(self.models),
            "package_version": self.package_version,
            "low_memory": {node: dict(entry) for node, entry in self.low_memory.items()},
            "manifest_uri": self.manifest_uri,
            "spec_sha256": self.spec_sha256,
            "params": dict(self.params),
            "inputs": dict(self.inputs),
            "stats": dict(self.stats),
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, *, uri: str | None = None) -> GroupManifest:
        """Validate and load; :class:`BadArtifact` says which field is wrong."""
        try:
            return _parse(data)
        except _Invalid as err:
            where = f" {uri}" if uri else ""
            raise BadArtifact(f"invalid group manifest{where}: {err}", uri=uri) from None

    @classmethod
    def from_json(cls, text: str | bytes, *, uri: str | None = None) -> GroupManifest:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            where = f" {uri}" if uri else ""
            raise BadArtifact(f"group manifest{where} is not valid JSON: {err}", uri=uri) from None
        return cls.from_dict(data, uri=uri)


# --- validation -----------------------------------------------------------------------------------------------


class _Invalid(Exception):
    pass


def _get(data: dict[str, Any], name: str, where: str, *, default: Any = ...) -> Any:
    if name not in data:
        if default is ...:
            raise _Invalid(f"{where}{name}: missing")
        return default
    return data[name]


def _str(value: Any, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _Invalid(f"{where}: expected a{'' if empty else ' non-empty'} string, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"{where}: expected a number, got {value!r}")
    return value


def _sha256(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise _Invalid(f"{where}: expected a sha256 (64 lowercase hex digits), got {value!r}")
    return value


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _shape(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    return [_int(size, f"{where}[{i}]") for i, size in enumerate(_list(value, where))]


def _output(data: Any, where: str) -> OutputRecord:
    data = _dict(data, where)
    dtype = _get(data, "dtype", where + ".", default=None)
    return OutputRecord(
        node=_str(_get(data, "node", where + "."), f"{where}.node"),
        output=_int(_get(data, "output", where + "."), f"{where}.output"),
        type=_str(_get(data, "type", where + "."), f"{where}.type"),
        uri=_str(_get(data, "uri", where + "."), f"{where}.uri"),
        sha256=_sha256(_get(data, "sha256", where + "."), f"{where}.sha256"),
        bytes=_int(_get(data, "bytes", where + "."), f"{where}.bytes"),
        shape=_shape(_get(data, "shape", where + ".", default=None), f"{where}.shape"),
        dtype=None if dtype is None else _str(dtype, f"{where}.dtype"),
        meta=dict(_dict(_get(data, "meta", where + ".", default={}), f"{where}.meta")),
    )


def _image(data: Any, where: str) -> ImageRecord:
    data = _dict(data, where)
    return ImageRecord(
        node=_str(_get(data, "node", where + "."), f"{where}.node"),
        uri=_str(_get(data, "uri", where + "."), f"{where}.uri"),
        filename=_str(_get(data, "filename", where + "."), f"{where}.filename"),
        width=_int(_get(data, "width", where + "."), f"{where}.width"),
        height=_int(_get(data, "height", where + "."), f"{where}.height"),
        sha256=_sha256(_get(data, "sha256", where + "."), f"{where}.sha256"),
        subfolder=_str(_get(data, "subfolder", where + ".", default=""), f"{where}.subfolder", empty=True),
    )


def _seconds(data: Any, where: str) -> dict[str, float]:
    return {_str(k, f"{where} key"): _number(v, f"{where}.{k}") for k, v in _dict(data, where).items()}


def _timings(data: Any) -> Timings:
    data = _dict(data, "timings")
    totals = _seconds(data.get("totals", {}), "timings.totals")
    totals.update(_seconds({k: v for k, v in data.items() if k not in ("nodes", "totals")}, "timings"))
    return Timings(nodes=_seconds(data.get("nodes", {}), "timings.nodes"), totals=totals)


def _parse(data: Any) -> GroupManifest:
    data = _dict(data, "manifest")
    if data.get("schema") != SCHEMA:
        raise _Invalid(f"schema must be {SCHEMA!r}, got {data.get('schema')!r}")
    if data.get("version") != VERSION:
        raise _Invalid(f"version {data.get('version')!r} is not supported (this airflow-comfy reads {VERSION}); "
                       "use the same airflow-comfy version everywhere")
    workflow = _dict(_get(data, "workflow", ""), "workflow")
    outputs = [_output(item, f"outputs[{i}]") for i, item in enumerate(_list(_get(data, "outputs", ""), "outputs"))]
    seen: set[tuple[str, int]] = set()
    for i, record in enumerate(outputs):
        if (record.node, record.output) in seen:
            raise _Invalid(f"outputs[{i}]: output {record.output} of node {record.node!r} is listed twice")
        seen.add((record.node, record.output))
    models = _dict(_get(data, "models", "", default={}), "models")
    return GroupManifest(
        workflow_name=_str(_get(workflow, "name", "workflow."), "workflow.name"),
        workflow_sha256=_str(_get(workflow, "sha256", "workflow."), "workflow.sha256", empty=True),
        group=_str(_get(data, "group", ""), "group"),
        run_key=_str(_get(data, "run_key", ""), "run_key"),
        try_number=_int(_get(data, "try", ""), "try"),
        outputs=outputs,
        images=[_image(item, f"images[{i}]") for i, item in enumerate(_list(_get(data, "images", "", default=[]),
                                                                            "images"))],
        timings=_timings(_get(data, "timings", "", default={})),
        models={_str(k, "models key"): _sha256(v, f"models[{k!r}]") for k, v in models.items()},
        manifest_uri=_str(_get(data, "manifest_uri", "", default=""), "manifest_uri", empty=True),
        package_version=_str(_get(data, "package_version", "", default=""), "package_version", empty=True),
        low_memory={_str(k, "low_memory key"): dict(_dict(v, f"low_memory[{k!r}]"))
                    for k, v in _dict(_get(data, "low_memory", "", default={}), "low_memory").items()},
        spec_sha256=_optional_sha256(_get(data, "spec_sha256", "", default=""), "spec_sha256"),
        params=dict(_dict(_get(data, "params", "", default={}), "params")),
        inputs={_str(k, "inputs key"): _sha256(v, f"inputs[{k!r}]")
                for k, v in _dict(_get(data, "inputs", "", default={}), "inputs").items()},
        stats=_stats(_get(data, "stats", "", default={})),
    )


def _stats(data: Any) -> dict[str, Any]:
    """The ``stats`` object: ``nodes`` and ``totals`` objects when present (their figures are not checked: they
    inform, nothing reads them to compute)."""
    data = dict(_dict(data, "stats"))
    for name in ("nodes", "totals"):
        if name in data:
            _dict(data[name], f"stats.{name}")
    return data


def _optional_sha256(value: Any, where: str) -> str:
    return "" if value == "" else _sha256(value, where)
