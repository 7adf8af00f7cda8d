"""The ``[comfy]`` settings, read from Airflow's configuration (``AIRFLOW__COMFY__*`` works too).

Used by the Airflow side (factory, operators, CLI). The ``workflow`` package and the runner never read it:
they get everything they need as arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from airflow_comfy.artifacts.limits import StoreLimits
from airflow_comfy.provider_info import CONFIG_OPTIONS
from airflow_comfy.scheduling.tiers import check_default_tier, parse_priority_classes, parse_tiers
from airflow_comfy.workflow.inputs import InputRoots

SECTION = "comfy"


@dataclass(frozen=True)
class ComfySettings:
    workflows_folder: str
    backend: str
    artifact_store: str
    aws_conn_id: str
    aws_secret_name: str
    link_endpoint_url: str
    models_path: str
    input_path: str
    input_store: str
    object_info_files: tuple[str, ...]
    runner_python: str
    runner_image: str
    namespace: str
    kubernetes_conn_id: str
    service_account_name: str
    image_pull_policy: str
    models_pvc: str
    pod_models_path: str
    pod_input_path: str
    default_pool: str
    pools_file: str
    local_gpus: str
    runners_per_gpu: int
    device_lock_dir: str
    runner_service: bool
    runner_service_dir: str
    runner_service_socket: str
    runner_service_idle_timeout: float
    runner_service_cache_mb: float
    runner_service_cpu_slots: int
    tiers: tuple[tuple[str, int], ...]
    """(tier, priority weight) pairs, in the order configured."""
    default_tier: str
    priority_classes: tuple[tuple[str, str], ...]
    """(tier, Kubernetes PriorityClass name) pairs; tiers without a class are left out."""
    preemption: bool
    preempt_tiers: str
    preempt_after: float
    preempt_max: int
    cache_dir: str
    max_workflow_bytes: int
    max_workflow_nodes: int
    retries: int
    retry_delay: float
    #: True: the delay doubles with each retry; a number: the multiplier; False: constant.
    retry_exponential_backoff: bool | float
    #: seconds; None: Airflow's own limit
    max_retry_delay: float | None
    pod_disruption_restarts: int
    avoid_failed_nodes: bool
    #: seconds; None: no limit
    execution_timeout: float | None
    store_connect_timeout: float
    store_read_timeout: float
    store_operation_timeout: float
    store_attempts: int

    @property
    def store_limits(self) -> StoreLimits:
        """The ``store_*`` settings as the stores take them."""
        return StoreLimits(connect_timeout=self.store_connect_timeout, read_timeout=self.store_read_timeout,
                           operation_timeout=self.store_operation_timeout, attempts=self.store_attempts)

    @property
    def input_roots(self) -> InputRoots:
        """Where image params may point: the input folder and the input store."""
        return InputRoots(folder=os.path.abspath(self.input_path), store=self.input_store)

    @property
    def tier_weights(self) -> dict[str, int]:
        return dict(self.tiers)

    @property
    def tier_classes(self) -> dict[str, str]:
        return dict(self.priority_classes)


def airflow_home() -> str:
    return os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")


def raw_setting(name: str) -> str:
    """The text of one ``[comfy]`` option (environment, then Airflow's configuration, then the default)."""
    kind, default, _, _ = CONFIG_OPTIONS[name]
    env = os.environ.get(f"AIRFLOW__{SECTION.upper()}__{name.upper()}")
    if env is not None:
        return env
    try:
        from airflow.configuration import conf

        value = conf.get(SECTION, name, fallback=None)
    except Exception:  # Airflow absent or misconfigured: the documented defaults still apply
        value = None
    return default if value is None else str(value)


def get_settings(**overrides) -> ComfySettings:
    """Current settings; ``overrides`` (field=value) win over configuration."""
    values = {}
    for f in fields(ComfySettings):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = raw_setting(f.name).replace("{AIRFLOW_HOME}", airflow_home())
        if f.name == "object_info_files":
            values[f.name] = tuple(part.strip() for part in raw.split(",") if part.strip())
        elif f.name in ("tiers", "priority_classes"):
            values[f.name] = raw  # parsed below, once the tiers are known
        elif f.name == "retry_exponential_backoff":
            values[f.name] = parse_backoff(raw)
        elif f.name in ("max_retry_delay", "execution_timeout"):
            values[f.name] = float(raw) if raw.strip() else None
        elif CONFIG_OPTIONS[f.name][0] == "integer":
            values[f.name] = int(raw)
        elif CONFIG_OPTIONS[f.name][0] == "float":
            values[f.name] = float(raw)
        elif CONFIG_OPTIONS[f.name][0] == "boolean":
            values[f.name] = _boolean(f.name, raw)
        else:
            values[f.name] = raw
    for name in ("retries", "pod_disruption_restarts"):
        if values[name] < 0:
            raise ValueError(f"[comfy] {name} must not be negative, not {values[name]}")
    for name in ("retry_delay", "max_retry_delay"):
        if values[name] is not None and values[name] < 0:
            raise ValueError(f"[comfy] {name} must not be negative, not {values[name]}")
    if values["execution_timeout"] is not None and not values["execution_timeout"] > 0:
        raise ValueError(f"[comfy] execution_timeout must be a positive number of seconds or empty, not "
                         f"{values['execution_timeout']}")
    try:
        StoreLimits(connect_timeout=values["store_connect_timeout"], read_timeout=values["store_read_timeout"],
                    operation_timeout=values["store_operation_timeout"], attempts=values["store_attempts"])
    except ValueError as exc:
        raise ValueError(f"[comfy] store_* settings: {exc}") from None
    if values["input_store"] and not values["input_store"].lower().startswith("s3://"):
        raise ValueError(f"[comfy] input_store must be an s3://bucket/prefix URI or empty, not "
                         f"{values['input_store']!r}")
    if values["backend"] not in ("local", "kubernetes"):
        raise ValueError(f"[comfy] backend must be 'local' or 'kubernetes', not {values['backend']!r}")
    if values["runner_service_idle_timeout"] <= 0 or values["runner_service_cache_mb"] < 0:
        raise ValueError("[comfy] runner_service_idle_timeout must be positive and runner_service_cache_mb not "
                         "negative")
    if values["runner_service_cpu_slots"] < 1:
        raise ValueError(f"[comfy] runner_service_cpu_slots must be at least 1, not "
                         f"{values['runner_service_cpu_slots']}")
    if values["runners_per_gpu"] < 1:
        raise ValueError(f"[comfy] runners_per_gpu must be at least 1, not {values['runners_per_gpu']}")
    from airflow_comfy.operators.devices import check_local_gpus

    check_local_gpus(values["local_gpus"])
    check_runner_service_socket(values["runner_service_socket"], values["local_gpus"])
    tiers = _tier_pairs(values["tiers"], parse_tiers)
    values["tiers"] = tuple(tiers.items())
    check_default_tier(values["default_tier"], tiers, "[comfy] default_tier")
    from airflow_comfy.scheduling.preemption import preempting_tiers

    preempting_tiers(values["preempt_tiers"], tiers)
    if values["preempt_after"] < 0 or values["preempt_max"] < 0:
        raise ValueError("[comfy] preempt_after and preempt_max must not be negative")
    values["priority_classes"] = tuple(
        _tier_pairs(values["priority_classes"], lambda text: parse_priority_classes(text, tiers)).items())
    return ComfySettings(**values)


#: Longest path of a Unix socket on Linux (sun_path is 108 bytes, with the final NUL).
MAX_SOCKET_PATH = 107


def check_runner_service_socket(path: str, local_gpus: str) -> None:
    """``runner_service_socket``: empty, or an absolute path short enough for a Unix socket, never together with
    ``local_gpus`` (a service in another container holds its own GPUs; the worker has none to hand out)."""
    if not path.strip():
        return
    if not os.path.isabs(path):
        raise ValueError(f"[comfy] runner_service_socket must be an absolute path, not {path!r}")
    if len(path.encode("utf-8")) > MAX_SOCKET_PATH:
        raise ValueError(f"[comfy] runner_service_socket {path!r} is over {MAX_SOCKET_PATH} bytes, the longest "
                         "Unix socket path")
    if local_gpus.strip():
        raise ValueError(f"[comfy] runner_service_socket ({path}) and local_gpus ({local_gpus}) cannot be set "
                         "together: the runner service's own container holds its GPUs; leave local_gpus empty")


def _tier_pairs(value, parse) -> dict:
    """A tier setting as a checked dict, from its text or from an override given as a mapping or pairs."""
    if not isinstance(value, str):
        value = ",".join(f"{name}:{item}" for name, item in dict(value).items())
    return parse(value)
_TRUE = ("true", "t", "yes", "y", "on", "1")
_FALSE = ("false", "f", "no", "n", "off", "0", "")


def _boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"[comfy] {name} must be true or false, not {raw!r}")


def parse_backoff(raw: str | bool | float) -> bool | float:
    """``retry_exponential_backoff``: true/false, or a multiplier (a number >= 0)."""
    if isinstance(raw, bool | int | float):
        value: bool | float = raw if isinstance(raw, bool) else float(raw)
    else:
        text = raw.strip().lower()
        if text in ("true", "yes", "on"):
            value = True
        elif text in ("false", "no", "off", ""):
            value = False
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"[comfy] retry_exponential_backoff must be true, false or a multiplier, "
                                 f"not {raw!r}") from None
    if not isinstance(value, bool) and value < 0:
        raise ValueError(f"[comfy] retry_exponential_backoff must not be negative, not {raw!r}")
    return value
