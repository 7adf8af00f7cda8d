"""GPU pools: declared once in a YAML file (``[comfy] pools_file``), used three ways.

1. ``airflow-comfy pools sync`` creates or updates the Airflow pools of that name and slot count, so the
   scheduler never runs more group tasks on a kind of GPU than there are slots.
2. Each group task is put in a pool: the sidecar's ``pool`` (per task or top level), else by what the group
   does: a group that samples (runs the diffusion model: KSampler, KSamplerAdvanced, SamplerCustom...) goes to
   the pool whose ``role`` is ``sampling``; every other group (text encoding, VAE encode/decode, image-only
   work) to the pool whose ``role`` is ``light``; without such a pool, to ``[comfy] default_pool``.
3. A group pod asks Kubernetes for what its pool declares: cpu/memory requests, a memory limit, the GPU
   count as a limit of the pool's GPU resource, the node selector, tolerations and runtime class, and the
   pool's runner image if it names one. The sidecar's own ``resources``/``node_selector``/``tolerations``/
   ``image`` still win (see :func:`merge_resources`).

Every task takes one slot of its pool (``pool_slots: 1``) unless its sidecar says otherwise: a slot is one
group task at a time, however many GPUs the pool gives each pod.

The file::

    pools:
      gpu_big:                        # the Airflow pool's name
        slots: 4                      # Airflow pool slots (-1: unlimited)
        gpus: 1                       # per pod, a limit of gpu_resource (default 0)
        gpu_resource: nvidia.com/gpu  # the default
        memory: 48Gi                  # request and limit
        cpu: "8"                      # request
        node_selector: {gpu-class: a100}
        tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
        runtime_class: nvidia         # the pod's runtimeClassName
        image: registry.example.com/comfy-runner:0.1.0-cuda
        role: sampling                # sampling | light: the groups that default to this pool
        description: A100 nodes

Unknown keys and wrong types are errors naming the file and the pool. Pure Python: no Airflow (except in
:func:`sync_pools`, imported there), no Kubernetes client, no torch.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from airflow_comfy.workflow.errors import Problem, WorkflowError

ROLES = ("sampling", "light")
SAMPLING = "sampling"
LIGHT = "light"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
#: Nodes that run the diffusion model: a group with one of them is a sampling group.
SAMPLING_NODE_TYPES = frozenset({"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"})

POOL_KEYS = ("slots", "gpus", "gpu_resource", "memory", "cpu", "node_selector", "tolerations", "runtime_class",
             "image", "role", "description")
TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# An Airflow pool name we accept (Airflow allows up to 256 characters of anything; we keep to task-id-like ones).
_POOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
# Kubernetes resource.Quantity: a decimal number and an optional binary/decimal suffix or exponent.
_QUANTITY_RE = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE])?$")
# An extended resource name: domain/name, e.g. nvidia.com/gpu, amd.com/gpu, gpu.intel.com/i915.
_RESOURCE_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# A DNS-1123 subdomain (a RuntimeClass name).
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# A label key (optional DNS prefix, then a name of up to 63 characters).
_LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class PoolSpec:
    """One declared pool."""

    name: str
    slots: int
    gpus: int = 0
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    memory: str | None = None
    cpu: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    runtime_class: str | None = None
    image: str | None = None
    role: str | None = None
    description: str | None = None

    def resources(self) -> dict[str, dict[str, str]]:
        """The pod's resources in Kubernetes form: cpu and memory requested, memory limited to the same
        amount, the GPUs as a limit of the GPU resource (Kubernetes sets an extended resource's request to its
        limit)."""
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if self.cpu:
            requests["cpu"] = self.cpu
        if self.memory:
            requests["memory"] = limits["memory"] = self.memory
        if self.gpus:
            limits[self.gpu_resource] = str(self.gpus)
        return {kind: values for kind, values in (("requests", requests), ("limits", limits)) if values}

    def airflow_description(self) -> str:
        """The Airflow pool's description: the file's, else what a slot gives a pod."""
        if self.description:
            return self.description
        parts = [f"{self.gpus} x {self.gpu_resource}" if self.gpus else "no GPU"]
        if self.cpu:
            parts.append(f"cpu {self.cpu}")
        if self.memory:
            parts.append(f"memory {self.memory}")
        if self.role:
            parts.append(f"default for {self.role} groups")
        return "airflow-comfy: " + ", ".join(parts)


@dataclass(frozen=True)
class PoolsConfig:
    """The pools of one file (none when no file is configured)."""

    path: str | None = None
    pools: dict[str, PoolSpec] = field(default_factory=dict)
    digest: str = ""
    """sha256 of the file's bytes ("" without a file): part of the parse cache's context."""

    def get(self, name: str | None) -> PoolSpec | None:
        return self.pools.get(name) if name else None

    def for_role(self, role: str) -> PoolSpec | None:
        return next((pool for pool in self.pools.values() if pool.role == role), None)


@dataclass(frozen=True)
class PoolAssignment:
    """Where one group task runs: the Airflow pool, what the pools file declares for it, and the group's role."""

    pool: str
    spec: PoolSpec | None
    role: str


# --- reading the file --------------------------------------------------------------------------------------


def load_pools(path: str | Path | None) -> PoolsConfig:
    """The pools declared in ``path`` (nothing for ``None`` or "")."""
    if not path:
        return PoolsConfig()
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _error(source, f"cannot read the file: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(source, f"not UTF-8 text: {exc}") from exc
    return parse_pools(text, source, digest=hashlib.sha256(data).hexdigest())


def parse_pools(text: str, source: str, *, digest: str | None = None) -> PoolsConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _error(source, f"invalid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise _error(source, "must be a YAML mapping with a 'pools' key")
    unknown = sorted(map(str, set(data) - {"pools"}))
    if unknown:
        raise _error(source, f"unknown top-level key(s) {', '.join(map(repr, unknown))}; allowed: pools")
    declared = data.get("pools")
    if not isinstance(declared, Mapping) or not declared:
        raise _error(source, "'pools' must map pool names to their settings (at least one pool)")
    pools: dict[str, PoolSpec] = {}
    for name, settings in declared.items():
        pools[str(name)] = _pool(name, settings, source)
    for role in ROLES:
        holders = [p.name for p in pools.values() if p.role == role]
        if len(holders) > 1:
            raise _error(source, f"pools {', '.join(map(repr, holders))} all have role {role!r}; at most one "
                                 "pool may be the default of a role")
    return PoolsConfig(path=source, pools=pools,
                       digest=digest if digest is not None else hashlib.sha256(text.encode()).hexdigest())


def _pool(name: Any, settings: Any, source: str) -> PoolSpec:
    if not isinstance(name, str) or not _POOL_NAME_RE.match(name):
        raise _error(source, f"pool name {name!r} must be a string of letters, digits, '_', '.' and '-'")

    def fail(message: str) -> WorkflowError:
        return _error(source, f"pool {name!r}: {message}")

    if not isinstance(settings, Mapping):
        raise fail(f"must be a mapping of settings ({', '.join(POOL_KEYS)}), not {type(settings).__name__}")
    unknown = sorted(map(str, set(settings) - set(POOL_KEYS)))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(POOL_KEYS)}")
    if "slots" not in settings:
        raise fail("'slots' is required (the Airflow pool's slot count)")
    slots = settings["slots"]
    if not _is_int(slots) or slots < -1:
        raise fail(f"slots must be an integer >= 0 (or -1: unlimited), not {slots!r}")
    gpus = settings.get("gpus", 0)
    if not _is_int(gpus) or gpus < 0:
        raise fail(f"gpus must be an integer >= 0, not {gpus!r}")
    gpu_resource = settings.get("gpu_resource", DEFAULT_GPU_RESOURCE)
    if not isinstance(gpu_resource, str) or not _RESOURCE_NAME_RE.match(gpu_resource):
        raise fail(f"gpu_resource must be an extended resource name like nvidia.com/gpu, not {gpu_resource!r}")
    role = settings.get("role")
    if role is not None and role not in ROLES:
        raise fail(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    runtime_class = settings.get("runtime_class")
    if runtime_class is not None and (not isinstance(runtime_class, str) or len(runtime_class) > 253
                                      or not _DNS_SUBDOMAIN_RE.match(runtime_class)):
        raise fail(f"runtime_class must be a RuntimeClass name (lower-case DNS name), not {runtime_class!r}")
    return PoolSpec(
        name=name,
        slots=slots,
        gpus=gpus,
        gpu_resource=gpu_resource,
        memory=_quantity(settings.get("memory"), "memory", fail),
        cpu=_quantity(settings.get("cpu"), "cpu", fail),
        node_selector=_node_selector(settings.get("node_selector"), fail),
        tolerations=_tolerations(settings.get("tolerations"), fail),
        runtime_class=runtime_class,
        image=_text(settings.get("image"), "image", fail),
        role=role,
        description=_text(settings.get("description"), "description", fail),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any, key: str, fail) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise fail(f"{key} must be a non-empty string, not {value!r}")
    return value


def _quantity(value: Any, key: str, fail) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise fail(f"{key} must be a Kubernetes quantity such as \"4\", \"500m\" or \"16Gi\", not {value!r}")
    text = str(value)
    match = _QUANTITY_RE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise fail(f"{key} must be a positive Kubernetes quantity such as \"4\", \"500m\" or \"16Gi\", "
                   f"not {value!r}")
    return text


def _node_selector(value: Any, fail) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail("node_selector must map label keys to values")
    selector = {}
    for key, label in value.items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.match(key):
            raise fail(f"node_selector key {key!r} is not a Kubernetes label key")
        if isinstance(label, bool) or not isinstance(label, str | int | float):
            hint = f" (quote it: \"{str(label).lower()}\")" if isinstance(label, bool) else ""
            raise fail(f"node_selector.{key} must be a string{hint}, not {label!r}")
        selector[key] = str(label)
    return selector


def _tolerations(value: Any, fail) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise fail("tolerations must be a list of mappings (key, operator, value, effect, tolerationSeconds)")
    out = []
    for index, toleration in enumerate(value):
        where = f"tolerations[{index}]"
        if not isinstance(toleration, Mapping):
            raise fail(f"{where} must be a mapping, not {toleration!r}")
        unknown = sorted(map(str, set(toleration) - set(TOLERATION_KEYS)))
        if unknown:
            raise fail(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed (Kubernetes' "
                       f"camelCase names): {', '.join(TOLERATION_KEYS)}")
        for key in ("key", "value"):
            if key in toleration and not isinstance(toleration[key], str):
                raise fail(f"{where}.{key} must be a string, not {toleration[key]!r}")
        if "operator" in toleration and toleration["operator"] not in TOLERATION_OPERATORS:
            raise fail(f"{where}.operator must be one of {', '.join(TOLERATION_OPERATORS)}, "
                       f"not {toleration['operator']!r}")
        if "effect" in toleration and toleration["effect"] not in TOLERATION_EFFECTS:
            raise fail(f"{where}.effect must be one of {', '.join(TOLERATION_EFFECTS)}, not {toleration['effect']!r}")
        if "tolerationSeconds" in toleration and not _is_int(toleration["tolerationSeconds"]):
            raise fail(f"{where}.tolerationSeconds must be an integer, not {toleration['tolerationSeconds']!r}")
        if toleration.get("operator") == "Exists" and "value" in toleration:
            raise fail(f"{where}: operator Exists takes no value")
        out.append(dict(toleration))
    return tuple(out)


def _error(source: str, message: str) -> WorkflowError:
    return WorkflowError(Problem(f"pools file: {message}", "bad_pools_file", file=source))


# --- which pool a group runs in ----------------------------------------------------------------------------


def group_role(nodes: Mapping[str, Mapping[str, Any]]) -> str:
    """``sampling`` when the group runs the diffusion model (one of :data:`SAMPLING_NODE_TYPES`), else
    ``light``."""
    if any(node.get("class_type") in SAMPLING_NODE_TYPES for node in nodes.values()):
        return SAMPLING
    return LIGHT


def assign_pool(nodes: Mapping[str, Mapping[str, Any]], *, explicit: str | None, pools: PoolsConfig,
                default_pool: str) -> PoolAssignment:
    """The pool of a group: ``explicit`` (the sidecar's, or a forced one) when given, else the pool declared
    for the group's role, else ``default_pool``."""
    role = group_role(nodes)
    if explicit:
        return PoolAssignment(explicit, pools.get(explicit), role)
    declared = pools.for_role(role)
    if declared is not None:
        return PoolAssignment(declared.name, declared, role)
    return PoolAssignment(default_pool, pools.get(default_pool), role)


def check_pool_name(name: str, pools: PoolsConfig, default_pool: str) -> str | None:
    """Why ``name`` cannot be used as a pool (None when it can). With a pools file, a pool must be declared in
    it or be ``[comfy] default_pool``: a misspelt pool would leave its tasks queued for ever. Without one, any
    name goes (the Airflow pool is made by hand)."""
    if not pools.path or name in pools.pools or name == default_pool:
        return None
    return (f"pool {name!r} is not declared in the pools file {pools.path} (declared: "
            f"{', '.join(sorted(pools.pools))}; or use [comfy] default_pool {default_pool!r})")


def mentions_gpu(resources: Mapping[str, Mapping[str, Any]] | None) -> bool:
    """Whether ``resources`` name a GPU resource (``nvidia.com/gpu``, ``amd.com/gpu``, ...), at any amount."""
    return any("gpu" in name.lower() for values in (resources or {}).values() for name in (values or {}))


def merge_resources(base: Mapping[str, Mapping[str, str]] | None,
                    override: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, str]] | None:
    """``base`` (the pool's) with ``override`` (the sidecar's) winning per resource name: a resource the
    override names at all (as a request or a limit) is taken from the override alone, so a request never ends
    up above a limit from the other side."""
    named = {name for values in (override or {}).values() for name in (values or {})}
    merged: dict[str, dict[str, str]] = {}
    for kind in ("requests", "limits"):
        values = {k: str(v) for k, v in ((base or {}).get(kind) or {}).items() if k not in named}
        values.update({k: str(v) for k, v in ((override or {}).get(kind) or {}).items()})
        if values:
            merged[kind] = values
    return merged or None


def merge_tolerations(first: Iterable[Mapping[str, Any]], second: Iterable[Mapping[str, Any]]
                      ) -> tuple[dict[str, Any], ...]:
    out: list[dict[str, Any]] = []
    for toleration in (*first, *second):
        if dict(toleration) not in out:
            out.append(dict(toleration))
    return tuple(out)


# --- Airflow pools -----------------------------------------------------------------------------------------


def sync_pools(pools: PoolsConfig, *, dry_run: bool = False, client: Any = None) -> list[str]:
    """Create or update the Airflow pool of every declared pool, through Airflow's own pool API (what
    ``airflow pools set`` calls: ``Client.create_pool`` -> ``Pool.create_or_update_pool``). Returns one line
    per pool: ``created NAME (N slots)``, ``updated NAME: A -> B slots``, ``unchanged NAME (N slots)``
    (``would create ...``/``would update ...`` when ``dry_run``, which changes nothing). Pools that are not in
    the file are left alone; an existing pool keeps its ``include_deferred`` and team."""
    if client is None:
        from airflow.api.client import get_current_api_client

        client = get_current_api_client()
    existing = {row[0]: row for row in client.get_pools()}
    lines = []
    for pool in pools.pools.values():
        description = pool.airflow_description()
        row = existing.get(pool.name)
        if row is None:
            verb, what = "create", f"{pool.name} ({_slots(pool.slots)})"
            include_deferred, team = False, None
        else:
            _, slots, old_description, include_deferred, team = (*row, None, None)[:5]
            changes = []
            if slots != pool.slots:
                changes.append(f"{slots} -> {_slots(pool.slots)}")
            if (old_description or "") != description:
                changes.append("description")
            if not changes:
                lines.append(f"unchanged {pool.name} ({_slots(pool.slots)})")
                continue
            verb, what = "update", f"{pool.name}: {', '.join(changes)}"
        if dry_run:
            lines.append(f"would {verb} {what}")
            continue
        client.create_pool(name=pool.name, slots=pool.slots, description=description,
                           include_deferred=bool(include_deferred), team_name=team)
        lines.append(f"{verb}d {what}")
    return lines


def _slots(slots: int) -> str:
    if slots == -1:
        return "unlimited slots"
    return f"{slots} slot" + ("" if slots == 1 else "s")
