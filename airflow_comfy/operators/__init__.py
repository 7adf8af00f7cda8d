"""Airflow operators that run one ComfyUI node group: in a Kubernetes pod or as a local subprocess.

Both run the same runner command (:mod:`airflow_comfy.operators.command`). Names are imported lazily, so
that a local-only deployment never pays for importing the Kubernetes provider.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_group_task": "airflow_comfy.operators.build",
    "GroupTaskConfig": "airflow_comfy.operators.task_config",
    "ComfyGroupLocalOperator": "airflow_comfy.operators.local",
    "ComfyGroupPodOperator": "airflow_comfy.operators.pod",
    "render_pod_manifests": "airflow_comfy.operators.render",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
