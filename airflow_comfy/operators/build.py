"""One group task from a GroupSpec: the operator for the configured backend, with Airflow's task settings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

from airflow_comfy.artifacts.limits import ENV as STORE_LIMITS_ENV
from airflow_comfy.config import ComfySettings
from airflow_comfy.operators.command import runner_arguments
from airflow_comfy.operators.task_config import GroupTaskConfig
from airflow_comfy.scheduling.tiers import WEIGHT_RULE
from airflow_comfy.workflow.groupspec import RUNNER_DEADLINE_ENV as DEADLINE_ENV
from airflow_comfy.workflow.groupspec import GroupSpec


def spec_doc_md(spec: GroupSpec) -> str:
    """The task's documentation in the UI: what the group computes, replays, reads and hands over.
    (The whole spec is the object the task's ``--spec`` argument names; ``airflow-comfy slice --json`` prints
    it.)"""
    replayed = set(spec.recipe_nodes)
    lines = [f"### ComfyUI group `{spec.group}` of workflow `{spec.workflow_name}`", "",
             f"Runs {len(spec.nodes)} node(s): {len(spec.nodes) - len(replayed)} computed, {len(replayed)} "
             "replayed (model loaders and patches).", "",
             "| node | class | role |", "|---|---|---|"]
    for node_id, node in spec.nodes.items():
        if node_id in replayed:
            role = "replayed: " + "/".join(spec.components.get(node_id, []))
        else:
            role = "output" if node_id in spec.output_nodes else "computed"
        lines.append(f"| {node_id} | {node.get('class_type', '?')} | {role} |")
    for value in spec.boundary_inputs:
        lines.append(f"\nReads {value.type} (node {value.node} output {value.output}) from `{value.group}`.")
    for value in spec.persist:
        lines.append(f"\nHands {value.type} (node {value.node} output {value.output}) to "
                     f"{', '.join(f'`{c}`' for c in value.consumers)}.")
    return "\n".join(lines) + "\n"


def task_kwargs(
    spec: GroupSpec, *, task_config: GroupTaskConfig, settings: ComfySettings, task_id: str | None, dag: Any
) -> dict[str, Any]:
    """BaseOperator arguments shared by both backends."""
    kwargs: dict[str, Any] = {
        "task_id": task_id or spec.group,
        "pool": task_config.pool or settings.default_pool,
        "pool_slots": task_config.pool_slots,
        "priority_weight": task_config.priority_weight,
        # A task's weight is its own, not the sum over its downstream tasks, so a tier's weight holds whatever
        # the DAG's shape (airflow_comfy.scheduling.tiers).
        "weight_rule": WEIGHT_RULE,
        "retries": task_config.retries,
        "retry_delay": timedelta(seconds=task_config.retry_delay_seconds),
        "retry_exponential_backoff": task_config.backoff_multiplier,
        "max_retry_delay": (
            timedelta(seconds=task_config.max_retry_delay_seconds)
            if task_config.max_retry_delay_seconds is not None
            else None
        ),
        "execution_timeout": (
            timedelta(seconds=task_config.execution_timeout_seconds)
            if task_config.execution_timeout_seconds is not None
            else None
        ),
        "doc_md": spec_doc_md(spec),
    }
    if dag is not None:
        kwargs["dag"] = dag
    return kwargs


def runner_env(settings: ComfySettings, execution_timeout_seconds: float | None) -> dict[str, str]:
    """The runner's bounds, as its environment: ``COMFY_STORE_TIMEOUTS`` (the ``[comfy] store_*`` settings) and
    ``COMFY_RUNNER_DEADLINE_S`` (:func:`runner_deadline` of the task's execution_timeout)."""
    env = {STORE_LIMITS_ENV: settings.store_limits.to_text()}
    if execution_timeout_seconds:
        env[DEADLINE_ENV] = f"{runner_deadline(execution_timeout_seconds):g}"
    return env


def runner_deadline(execution_timeout_seconds: float) -> float:
    """A little under the task's execution_timeout (10% less, at most 30 s less): the runner reports its own
    timeout, naming what it was doing, before Airflow kills it."""
    return round(execution_timeout_seconds - min(30.0, execution_timeout_seconds / 10), 3)


def build_group_task(
    spec: GroupSpec,
    *,
    task_config: GroupTaskConfig,
    settings: ComfySettings,
    upstream_task_ids: Sequence[str],
    dag: Any = None,
    task_id: str | None = None,
    runner_command: list[str] | None = None,
    spec_sha256: str | None = None,
) -> BaseOperator:
    """The task that runs ``spec``: a ``ComfyGroupPodOperator`` (backend "kubernetes") or a
    ``ComfyGroupLocalOperator`` (backend "local").

    ``upstream_task_ids`` are the tasks whose manifests (XCom ``return_value``) this group reads; the caller
    still sets the dependencies (``upstream >> task``). ``runner_command`` replaces the local backend's
    ``[python, -m, airflow_comfy.runner]`` (tests). ``spec_sha256``: ``spec.sha256()``, if already known.
    """
    common = task_kwargs(spec, task_config=task_config, settings=settings, task_id=task_id, dag=dag)
    spec_sha256 = spec_sha256 or spec.sha256()
    if task_config.backend == "kubernetes":
        return _pod_task(spec, task_config, settings, upstream_task_ids, dag, common, spec_sha256)
    return _local_task(spec, task_config, settings, upstream_task_ids, runner_command, common, spec_sha256)


def _pod_task(
    spec: GroupSpec,
    task_config: GroupTaskConfig,
    settings: ComfySettings,
    upstream_task_ids: Sequence[str],
    dag: Any,
    common: dict[str, Any],
    spec_sha256: str | None,
) -> BaseOperator:
    from airflow_comfy.operators.pod import ComfyGroupPodOperator, group_pod_kwargs, pod_models_path

    arguments = runner_arguments(
        spec,
        store=settings.artifact_store,
        models_path=pod_models_path(settings),
        input_path=settings.pod_input_path,
        upstream_task_ids=upstream_task_ids,
        spec_sha256=spec_sha256,
        input_store=settings.input_store,
        input_root=settings.input_roots.folder,  # file:// URIs name the folder as input_path does
    )
    dag_id = dag.dag_id if dag is not None else spec.workflow_name
    pod_kwargs = group_pod_kwargs(spec, task_config=task_config, settings=settings, dag_id=dag_id)
    pod_kwargs["env_vars"] = {**runner_env(settings, task_config.execution_timeout_seconds), **pod_kwargs["env_vars"]}
    return ComfyGroupPodOperator(arguments=arguments, group_spec=spec, spec_sha256=spec_sha256,
                                 store=settings.artifact_store, aws_conn_id=settings.aws_conn_id or None,
                                 **pod_kwargs, **common)


def _local_task(
    spec: GroupSpec,
    task_config: GroupTaskConfig,
    settings: ComfySettings,
    upstream_task_ids: Sequence[str],
    runner_command: list[str] | None,
    common: dict[str, Any],
    spec_sha256: str | None,
) -> BaseOperator:
    from airflow_comfy.operators.devices import group_needs_gpu
    from airflow_comfy.operators.local import ComfyGroupLocalOperator

    arguments = runner_arguments(
        spec,
        store=settings.artifact_store,
        models_path=settings.models_path,
        input_path=settings.input_path,
        upstream_task_ids=upstream_task_ids,
        spec_sha256=spec_sha256,
        input_store=settings.input_store,
    )
    return ComfyGroupLocalOperator(
        arguments=arguments,
        runner_python=settings.runner_python or None,
        runner_command=runner_command,
        env={**runner_env(settings, task_config.execution_timeout_seconds), **task_config.env},
        aws_conn_id=settings.aws_conn_id or None,
        group_spec=spec,
        spec_sha256=spec_sha256,
        store=settings.artifact_store,
        needs_gpu=group_needs_gpu(spec),
        **common,
    )
