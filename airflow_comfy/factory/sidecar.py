"""The optional sidecar ``<workflow>.comfy.yaml``: how a workflow becomes a DAG.

Example::

    schedule: "0 6 * * *"          # cron, preset, or null (default: triggered only)
    tags: [marketing]
    owner: data-eng
    description: Product shots for the catalog
    slicing: auto                  # auto | ui-groups | stages | single
    groups:                        # explicit assignment: task id -> node ids (wins over UI groups/stages)
      encode: ["6", "7"]
      sample: ["3", "5"]
      decode: ["8", "9"]
    backend: kubernetes            # local | kubernetes (default: [comfy] backend)
    image: registry.example.com/comfy-runner:0.1.0
    pool: gpu_small                # default: the pool of the group's role ([comfy] pools_file), else
                                   # [comfy] default_pool; with a pools file it must be declared there
    priority: vip                  # the runs' default tier: vip | high | normal | batch ([comfy] tiers)
    retries: 2
    retry_delay: 30                # seconds
    retry_exponential_backoff: true   # or a multiplier; retries/retry_delay/...: default [comfy]
    max_retry_delay: 600           # seconds
    resources: {requests: {cpu: "1", memory: 4Gi}}
    tasks:                         # per task id, overrides the settings above
      sample:
        pool: gpu_big
        resources: {limits: {nvidia.com/gpu: "1"}}
        node_selector: {gpu: a100}
    params:                        # extra trigger params: name -> "node.input" or a mapping
      style: {node: "6", input: text, title: Style prompt}
    auto_params: [sampler, scheduler]   # the built-in prompt/seed/steps/... params, plus the KSampler's
                                   # sampler and scheduler as choices (true: the built-in ones; false: none)

Unknown keys are errors (a typo must not be silently ignored); every error names the sidecar file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from airflow_comfy.scheduling.tiers import TierError, check_priority_class_name
from airflow_comfy.workflow.errors import Problem, WorkflowError
from airflow_comfy.workflow.params import AUTO_PARAM_NAMES
from airflow_comfy.workflow.slicing import SLICING_MODES

SIDECAR_SUFFIX = ".comfy.yaml"
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

TASK_KEYS = frozenset({
    "backend", "image", "pool", "pool_slots", "retries", "retry_delay", "retry_exponential_backoff",
    "max_retry_delay", "execution_timeout", "resources", "node_selector", "tolerations", "affinity",
    "priority_class_name", "env",
})
DAG_KEYS = frozenset({
    "dag_id", "schedule", "start_date", "catchup", "tags", "owner", "description", "slicing", "groups", "tasks",
    "params", "auto_params", "max_active_runs", "priority",
})
#: Keys that used to be allowed, with what replaces them.
RETIRED_KEYS = {
    "priority_weight": "a task's priority weight is its run's tier weight ([comfy] tiers): set 'priority' (the "
                       "default tier of the workflow's runs) or trigger a run with {\"tier\": ...}",
}


@dataclass
class Sidecar:
    path: str | None = None
    raw_text: str = ""
    dag_id: str | None = None
    schedule: str | None = None
    start_date: str | None = None
    catchup: bool = False
    tags: list[str] = field(default_factory=list)
    owner: str | None = None
    description: str | None = None
    slicing: str = "auto"
    groups: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    auto_params: bool | list[str] = True
    """True: the automatic params; False: none; a list: the automatic ones plus the optional ones it names."""
    max_active_runs: int | None = None
    priority: str | None = None
    """The default tier of the workflow's runs (a run's trigger conf ``tier`` wins); checked against the
    configured tiers when the DAG is built."""
    task_defaults: dict[str, Any] = field(default_factory=dict)
    """Task settings for every group (the TASK_KEYS found at the top level)."""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per task id overrides."""

    def task_settings(self, task_id: str) -> dict[str, Any]:
        return {**self.task_defaults, **self.tasks.get(task_id, {})}


def sidecar_path(workflow_path: Path) -> Path:
    return workflow_path.with_name(workflow_path.name[: -len(".json")] + SIDECAR_SUFFIX)


def load_sidecar(path: Path | None) -> Sidecar:
    if path is None or not path.exists():
        return Sidecar()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(path, f"cannot read sidecar: {exc}") from exc
    return parse_sidecar(text, str(path))


def parse_sidecar(text: str, source: str) -> Sidecar:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _error(source, f"invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _error(source, f"must be a YAML mapping, got {type(data).__name__}")
    _refuse_retired(data, source, "")
    unknown = sorted(set(data) - DAG_KEYS - TASK_KEYS)
    if unknown:
        raise _error(source, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join(sorted(DAG_KEYS | TASK_KEYS))}")
    sidecar = Sidecar(path=source, raw_text=text)
    sidecar.dag_id = _optional_str(data, "dag_id", source)
    sidecar.schedule = _optional_str(data, "schedule", source)
    sidecar.start_date = _optional_str(data, "start_date", source)
    sidecar.catchup = _bool(data, "catchup", False, source)
    sidecar.tags = [str(t) for t in _list(data, "tags", source)]
    sidecar.owner = _optional_str(data, "owner", source)
    sidecar.description = _optional_str(data, "description", source)
    sidecar.slicing = str(data.get("slicing", "auto"))
    if sidecar.slicing not in SLICING_MODES:
        raise _error(source, f"slicing must be one of {', '.join(SLICING_MODES)}, not {sidecar.slicing!r}")
    sidecar.groups = _groups(data.get("groups"), source)
    sidecar.params = dict(_mapping(data, "params", source))
    sidecar.auto_params = _auto_params(data.get("auto_params", True), source)
    if data.get("max_active_runs") is not None:
        sidecar.max_active_runs = _int(data["max_active_runs"], "max_active_runs", source, minimum=1)
    sidecar.priority = _optional_str(data, "priority", source)
    sidecar.task_defaults = _task_settings({k: v for k, v in data.items() if k in TASK_KEYS}, source, "")
    sidecar.tasks = {}
    for task_id, settings in _mapping(data, "tasks", source).items():
        if not isinstance(settings, Mapping):
            raise _error(source, f"tasks.{task_id} must be a mapping")
        _refuse_retired(settings, source, f"tasks.{task_id}.")
        if "priority" in settings:
            raise _error(source, f"tasks.{task_id}.priority: a tier is chosen per run, for all its tasks: set "
                                 "'priority' at the top level (the default tier of the workflow's runs)")
        unknown = sorted(set(settings) - TASK_KEYS)
        if unknown:
            raise _error(source, f"tasks.{task_id}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                                 f"{', '.join(sorted(TASK_KEYS))}")
        sidecar.tasks[str(task_id)] = _task_settings(settings, source, f"tasks.{task_id}.")
    return sidecar


def _task_settings(data: Mapping[str, Any], source: str, prefix: str) -> dict[str, Any]:
    out = dict(data)
    if "backend" in out and out["backend"] not in ("local", "kubernetes"):
        raise _error(source, f"{prefix}backend must be 'local' or 'kubernetes', not {out['backend']!r}")
    if out.get("priority_class_name") is not None:
        name = out["priority_class_name"]
        if not isinstance(name, str):
            raise _error(source, f"{prefix}priority_class_name must be a string")
        try:
            check_priority_class_name(name, f"{prefix}priority_class_name")
        except TierError as exc:
            raise _error(source, str(exc)) from None
    for key, minimum in (("retries", 0), ("pool_slots", 1)):
        if key in out:
            out[key] = _int(out[key], prefix + key, source, minimum=minimum)
    for key in ("retry_delay", "max_retry_delay", "execution_timeout"):
        if key in out and out[key] is not None:
            out[key] = _number(out[key], prefix + key, source)
    backoff = out.get("retry_exponential_backoff")
    if backoff is not None and not isinstance(backoff, bool):
        if not isinstance(backoff, int | float) or backoff < 0:
            raise _error(source, f"{prefix}retry_exponential_backoff must be true, false or a multiplier >= 0, "
                                 f"not {backoff!r}")
        out["retry_exponential_backoff"] = float(backoff)
    for key in ("resources", "node_selector", "affinity", "env"):
        if key in out and not isinstance(out[key], Mapping):
            raise _error(source, f"{prefix}{key} must be a mapping")
    if "resources" in out:
        bad = sorted(set(out["resources"]) - {"requests", "limits"})
        if bad:
            raise _error(source, f"{prefix}resources may only have 'requests' and 'limits', not {bad}")
        out["resources"] = {k: {str(n): str(q) for n, q in (v or {}).items()} for k, v in out["resources"].items()}
    tolerations = out.get("tolerations", [])
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        raise _error(source, f"{prefix}tolerations must be a list of mappings")
    return out


def _auto_params(value: Any, source: str) -> bool | list[str]:
    """``auto_params``: true, false, or a list of names from :data:`AUTO_PARAM_NAMES`."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise _error(source, f"auto_params must be true, false or a list of param names, not {value!r}")
    unknown = [name for name in value if name not in AUTO_PARAM_NAMES]
    if unknown:
        raise _error(source, f"auto_params: {', '.join(map(repr, unknown))} "
                             f"{'is not an automatic param' if len(unknown) == 1 else 'are not automatic params'}; "
                             f"the names are {', '.join(AUTO_PARAM_NAMES)}")
    return list(dict.fromkeys(value))


def _refuse_retired(data: Mapping[str, Any], source: str, prefix: str) -> None:
    for key, instead in RETIRED_KEYS.items():
        if key in data:
            raise _error(source, f"{prefix}{key} is no longer supported: {instead}")


def _groups(value: Any, source: str) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _error(source, "groups must map task ids to lists of node ids")
    groups = {}
    for name, node_ids in value.items():
        if not _TASK_ID_RE.match(str(name)):
            raise _error(source, f"group name {name!r} is not a valid task id (letters, digits, _ . -)")
        if not isinstance(node_ids, list):
            raise _error(source, f"groups.{name} must be a list of node ids")
        groups[str(name)] = [str(n) for n in node_ids]
    return groups


def _error(source: Any, message: str) -> WorkflowError:
    return WorkflowError(Problem(f"sidecar: {message}", "bad_sidecar", file=str(source)))


def _optional_str(data: Mapping, key: str, source: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, dict | list):
        raise _error(source, f"{key} must be a string")
    return str(value)


def _bool(data: Mapping, key: str, default: bool, source: str) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _error(source, f"{key} must be true or false")
    return value


def _list(data: Mapping, key: str, source: str) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise _error(source, f"{key} must be a list")
    return value


def _mapping(data: Mapping, key: str, source: str) -> Mapping:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise _error(source, f"{key} must be a mapping")
    return value


def _int(value: Any, key: str, source: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _error(source, f"{key} must be an integer >= {minimum}, not {value!r}")
    return value


def _number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _error(source, f"{key} must be a number of seconds >= 0, not {value!r}")
    return float(value)
