"""GroupSpec: the runner's input. One JSON document per group task.

It is the contract between the Airflow side and the compute side, so it is versioned: a runner refuses a
spec whose ``schema``/``version`` it does not know instead of guessing.

Shape (version 1)::

    {
      "schema": "airflow-comfy/group-spec", "version": 1,
      "workflow": {"name": "txt2img", "sha256": "..."},
      "group": "inference",                      # the group's task id
      "nodes": {"3": {"class_type": "KSampler", "inputs": {...}}},   # API form, recipe copies included
      "recipe_nodes": ["4"],                     # loaders/patches replayed here, not handed over
      "components": {"4": ["MODEL"]},            # which outputs of each recipe node this group uses
      "boundary_inputs": [{"node": "6", "output": 0, "type": "CONDITIONING", "group": "encode"}],
      "persist": [{"node": "3", "output": 0, "type": "LATENT", "consumers": ["post"]}],
      "output_nodes": ["9"],                     # SaveImage / PreviewImage in this group
      "params": {"seed": [{"node": "3", "input": "seed"}]},   # trigger params that override inputs here
      "upstream": ["encode"],
      "metadata": {"prompt": {...}, "workflow": {...}}   # only for groups with output nodes
    }
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "airflow-comfy/group-spec"
VERSION = 1
#: The runner's exit codes, the other half of the contract: 2 means the input is wrong and retrying cannot help
#: (the operators fail the task without retrying); any other non-zero code is an infrastructure failure.
EXIT_OK = 0
EXIT_BAD_INPUT = 2
#: The runner's exit code for an infrastructure failure (the store, the device ...): Airflow retries it.
EXIT_INFRASTRUCTURE = 1
#: The runner's environment variable for its own deadline in seconds (the operators set it from the task's
#: execution_timeout): past it the runner says what it was doing and exits with EXIT_INFRASTRUCTURE.
RUNNER_DEADLINE_ENV = "COMFY_RUNNER_DEADLINE_S"

DATA_URI_PREFIX = "data:application/json;base64,"
GZIP_DATA_URI_PREFIX = "data:application/gzip;base64,"
_GZIP_ABOVE = 2048


@dataclass(frozen=True)
class BoundaryValue:
    """An output of a node in another group that this group reads from the artifact store."""

    node: str
    output: int
    type: str
    group: str


@dataclass(frozen=True)
class PersistedValue:
    """An output of a node in this group that other groups read, so the runner writes it."""

    node: str
    output: int
    type: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class ParamBinding:
    node: str
    input: str


@dataclass
class GroupSpec:
    workflow_name: str
    workflow_sha256: str
    group: str
    nodes: dict[str, dict[str, Any]]
    recipe_nodes: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    boundary_inputs: list[BoundaryValue] = field(default_factory=list)
    persist: list[PersistedValue] = field(default_factory=list)
    output_nodes: list[str] = field(default_factory=list)
    params: dict[str, list[ParamBinding]] = field(default_factory=dict)
    upstream: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    """For groups with output nodes: ``prompt`` (the full API prompt) and ``workflow`` (the UI document), which
    SaveImage embeds in its PNGs as ComfyUI does."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "workflow": {"name": self.workflow_name, "sha256": self.workflow_sha256},
            "group": self.group,
            "nodes": self.nodes,
            "recipe_nodes": list(self.recipe_nodes),
            "components": {k: list(v) for k, v in self.components.items()},
            "boundary_inputs": [asdict(b) for b in self.boundary_inputs],
            "persist": [dict(asdict(p), consumers=list(p.consumers)) for p in self.persist],
            "output_nodes": list(self.output_nodes),
            "params": {name: [asdict(b) for b in bindings] for name, bindings in self.params.items()},
            "upstream": list(self.upstream),
            "metadata": self.metadata,
        }

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=indent is not None)

    def to_bytes(self) -> bytes:
        """The spec as the runner reads it from the artifact store: compact UTF-8 JSON, the same bytes for the
        same spec (its sha256 names the stored object and travels beside its URI)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def to_data_uri(self) -> str:
        """The spec as a self-contained ``data:`` URI: safe to put in a pod's args, where Airflow renders Jinja
        templates (a prompt containing ``{{`` must reach the runner untouched, so the JSON is base64). Specs
        that carry the UI workflow for PNG metadata are gzip-compressed (deterministically: same spec, same
        URI)."""
        compact = json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")
        if len(compact) > _GZIP_ABOVE:
            return GZIP_DATA_URI_PREFIX + base64.b64encode(gzip.compress(compact, mtime=0)).decode("ascii")
        return DATA_URI_PREFIX + base64.b64encode(compact).decode("ascii")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupSpec:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"not an airflow-comfy group spec (schema must be {SCHEMA!r})")
        if data.get("version") != VERSION:
            raise ValueError(
                f"group spec version {data.get('version')!r} is not supported by this runner (supports {VERSION}); "
                "use the same airflow-comfy version on the Airflow side and in the runner image"
            )
        workflow = data.get("workflow") or {}
        return cls(
            workflow_name=workflow.get("name", ""),
            workflow_sha256=workflow.get("sha256", ""),
            group=data["group"],
            nodes=data["nodes"],
            recipe_nodes=list(data.get("recipe_nodes", [])),
            components={k: list(v) for k, v in data.get("components", {}).items()},
            boundary_inputs=[BoundaryValue(**b) for b in data.get("boundary_inputs", [])],
            persist=[PersistedValue(**dict(p, consumers=tuple(p["consumers"]))) for p in data.get("persist", [])],
            output_nodes=list(data.get("output_nodes", [])),
            params={name: [ParamBinding(**b) for b in bs] for name, bs in data.get("params", {}).items()},
            upstream=list(data.get("upstream", [])),
            metadata=dict(data.get("metadata") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> GroupSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_data_uri(cls, uri: str) -> GroupSpec:
        if uri.startswith(GZIP_DATA_URI_PREFIX):
            payload = gzip.decompress(base64.b64decode(uri[len(GZIP_DATA_URI_PREFIX):]))
        elif uri.startswith(DATA_URI_PREFIX):
            payload = base64.b64decode(uri[len(DATA_URI_PREFIX):])
        else:
            raise ValueError(f"expected a {DATA_URI_PREFIX}... or {GZIP_DATA_URI_PREFIX}... URI")
        return cls.from_json(payload.decode("utf-8"))
