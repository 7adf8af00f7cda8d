"""Group pods as Kubernetes manifests, offline: what KPO would submit, for review, diffing and validation."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import yaml
from airflow.sdk.exceptions import AirflowNotFoundException
from kubernetes.client import ApiClient, Configuration

from airflow_comfy.operators.pod import ComfyGroupPodOperator

log = logging.getLogger(__name__)


def render_pod_manifest(task: ComfyGroupPodOperator) -> dict[str, Any]:
    """The pod ``task`` would create, built by its own ``build_pod_request_obj``.

    Uses KPO's ``dry_run`` mode, which needs neither a cluster nor kube credentials: no task-instance labels,
    no ``airflow_kpo_in_cluster`` label, Jinja templates left unrendered, and the name carries a random
    suffix as in a real run. KPO reads the xcom sidecar's image/resources from the Kubernetes connection; a
    connection that is not defined here is treated as one without such extras (the default one always is).
    """
    try:
        pod = task.build_pod_request_obj(dry_run=True)
    except AirflowNotFoundException:
        log.warning(
            "Kubernetes connection %r is not defined here; rendering the xcom sidecar with KPO's defaults",
            task.kubernetes_conn_id,
        )
        detached = copy.copy(task)  # the same operator, minus the connection (and the hook cached for it)
        detached.__dict__.pop("hook", None)
        detached.kubernetes_conn_id = None
        pod = detached.build_pod_request_obj(dry_run=True)
    return ApiClient(configuration=Configuration()).sanitize_for_serialization(pod)


def render_pod_manifests(tasks: Sequence[ComfyGroupPodOperator]) -> list[dict[str, Any]]:
    return [render_pod_manifest(task) for task in tasks]


def to_yaml(manifests: Sequence[dict[str, Any]]) -> str:
    """One YAML document per manifest, ``---`` separated."""
    return yaml.safe_dump_all(list(manifests), sort_keys=False, explicit_start=True, width=120)
