"""The ``[comfy]`` settings, read from Airflow's configuration (``AIRFLOW__COMFY__*`` works too).

Used by the Airflow side (factory, operators, CLI). The ``workflow`` package and the runner never read it:
they get everything they need as arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from airflow_comfy.provider_info import CONFIG_OPTIONS

SECTION = "comfy"


@dataclass(frozen=True)
class ComfySettings:
    workflows_folder: str
    backend: str
    artifact_store: str
    aws_conn_id: str
    aws_secret_name: str
    models_path: str
    input_path: str
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
    cache_dir: str
    max_workflow_bytes: int
    max_workflow_nodes: int


def airflow_home() -> str:
    return os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")


def _raw(name: str) -> str:
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
        raw = _raw(f.name).replace("{AIRFLOW_HOME}", airflow_home())
        if f.name == "object_info_files":
            values[f.name] = tuple(part.strip() for part in raw.split(",") if part.strip())
        elif CONFIG_OPTIONS[f.name][0] == "integer":
            values[f.name] = int(raw)
        else:
            values[f.name] = raw
    if values["backend"] not in ("local", "kubernetes"):
        raise ValueError(f"[comfy] backend must be 'local' or 'kubernetes', not {values['backend']!r}")
    if values["runners_per_gpu"] < 1:
        raise ValueError(f"[comfy] runners_per_gpu must be at least 1, not {values['runners_per_gpu']}")
    from airflow_comfy.operators.devices import check_local_gpus

    check_local_gpus(values["local_gpus"])
    return ComfySettings(**values)
