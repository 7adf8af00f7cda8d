"""Run one group in a Kubernetes pod: a KubernetesPodOperator whose container runs the runner command."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, TypeVar

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.pod_generator import make_safe_label_value
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from kubernetes.client import ApiClient, Configuration
from kubernetes.client import models as k8s

from airflow_comfy.config import ComfySettings
from airflow_comfy.metrics import emit_group_metrics, task_tags
from airflow_comfy.operators.command import EXIT_BAD_INPUT, RUNNER_MODULE, pod_arguments
from airflow_comfy.operators.disruption import PodDisrupted, PodDisruptionMixin
from airflow_comfy.operators.failure_text import runner_failure
from airflow_comfy.operators.links import GROUP_TASK_LINKS, MANIFEST_ATTRIBUTE
from airflow_comfy.operators.preemption_log import STOPPED_MESSAGE, log_preemptions
from airflow_comfy.operators.runner_log import pod_log_formatter
from airflow_comfy.operators.spec_publish import publish_group_spec
from airflow_comfy.operators.task_config import GroupTaskConfig
from airflow_comfy.workflow.groupspec import GroupSpec

#: The container's command; the image's ``python`` must have ``airflow-comfy[runner]`` installed.
POD_RUNNER_CMDS = ["python", "-m", RUNNER_MODULE]
MODELS_VOLUME = "comfy-models"
APP_LABEL = "app.kubernetes.io/name"
APP_NAME = "airflow-comfy"
WORKFLOW_LABEL = "airflow-comfy/workflow"
GROUP_LABEL = "airflow-comfy/group"
WORKFLOW_SHA_ANNOTATION = "airflow-comfy/workflow-sha256"
#: KPO appends "-" and 8 random characters to the name; a pod name must stay within 63.
POD_NAME_MAX = 63 - 9
#: Every container of a group pod (the runner and KPO's xcom sidecar) runs as this non-root user and group;
#: volumes are group-owned by it (fsGroup). The runner image needs no user of that id, only readable files.
POD_USER_ID = 1000
#: The root filesystem is read-only: the runner's only writable place is an emptyDir mounted here, and every
#: home/cache directory a library might write points into it.
SCRATCH_VOLUME = "comfy-scratch"
SCRATCH_PATH = "/tmp"
SCRATCH_ENV = {
    "HOME": SCRATCH_PATH,
    "TMPDIR": SCRATCH_PATH,
    "XDG_CACHE_HOME": f"{SCRATCH_PATH}/.cache",
    "XDG_CONFIG_HOME": f"{SCRATCH_PATH}/.config",
    "HF_HOME": f"{SCRATCH_PATH}/.cache/huggingface",
    "TORCH_HOME": f"{SCRATCH_PATH}/.cache/torch",
    "TRITON_CACHE_DIR": f"{SCRATCH_PATH}/.cache/triton",
    "CUDA_CACHE_PATH": f"{SCRATCH_PATH}/.cache/nv",
    "MPLCONFIGDIR": f"{SCRATCH_PATH}/.config/matplotlib",
    "PYTHONDONTWRITEBYTECODE": "1",
}

_Model = TypeVar("_Model")
# Each kubernetes model built without a configuration creates a new Configuration, which is slow (it
# resets logging handlers); the DAG factory builds many env vars per parse, so they share one.
_K8S_CONFIGURATION = Configuration()


def _k8s(klass: type[_Model], **fields: Any) -> _Model:
    """A Kubernetes client model built with the shared configuration (see ``_K8S_CONFIGURATION``)."""
    return klass(local_vars_configuration=_K8S_CONFIGURATION, **fields)


class ComfyGroupPodOperator(PodDisruptionMixin, KubernetesPodOperator):
    """A KubernetesPodOperator that runs the runner command in its pod.

    The container runs ``python -m airflow_comfy.runner <arguments> --xcom-path /airflow/xcom/return.json``;
    the runner writes its manifest there and KPO's xcom sidecar pushes it as XCom ``return_value``.
    ``HF_HUB_OFFLINE=1`` is always in the container's environment. Use :func:`group_pod_kwargs` (or
    ``build_group_task``) for the pod settings that come from ``[comfy]`` and the workflow's sidecar.

    The pod is restricted (Kubernetes' "restricted" Pod Security Standard, and a read-only root filesystem):
    both containers run as user/group :data:`POD_USER_ID` without privilege escalation, capabilities or a
    writable root; the runner writes only to the ``emptyDir`` at :data:`SCRATCH_PATH` (``HOME``, ``HF_HOME``,
    ``TORCH_HOME``, ``XDG_CACHE_HOME``... point there, unless ``env_vars`` say otherwise) and to the xcom
    volume. ``security_context``, ``container_security_context`` and
    ``xcom_sidecar_container_security_context`` may be passed to replace these defaults.

    When the runner container exits with code 2 (bad input), the task fails with ``AirflowFailException``,
    so Airflow does not retry it; any other failure stays a retryable ``AirflowException``.

    ``group_spec``/``spec_sha256``/``store``: before the pod is created, the worker writes the GroupSpec to the
    artifact store at the content address the arguments name (``aws_conn_id``: the Airflow connection whose
    credentials the worker uses for that write; the pod itself reads with its own, ``[comfy]
    aws_secret_name``).

    A pod that the cluster evicts or preempts is replaced by a new one within the try, at most
    ``pod_disruption_restarts`` times; a failed try leaves a failure record in ``store``, and with
    ``avoid_failed_nodes`` a later try's pods keep away from the nodes that failed
    (:mod:`airflow_comfy.operators.disruption`).
    """

    ui_color = "#d6eaf8"
    # priority_class_name is templated: rendered from the run's params when the task runs, it gives the pod the
    # priority class of the run's tier (airflow_comfy.scheduling.tiers), so one DAG serves every tier.
    template_fields = (*KubernetesPodOperator.template_fields, "priority_class_name")
    operator_extra_links = GROUP_TASK_LINKS

    def __init__(
        self,
        *,
        arguments: list[str],
        env_vars: dict[str, str] | None = None,
        cmds: list[str] | None = None,
        group_spec: GroupSpec | None = None,
        spec_sha256: str | None = None,
        store: str | None = None,
        aws_conn_id: str | None = None,
        pod_disruption_restarts: int = 3,
        avoid_failed_nodes: bool = True,
        **kwargs: Any,
    ) -> None:
        self.pod_disruption_restarts = pod_disruption_restarts
        self.avoid_failed_nodes = avoid_failed_nodes
        self.group_spec = group_spec
        self.spec_sha256 = spec_sha256
        self.store = store
        self.aws_conn_id = aws_conn_id or None
        env = {**SCRATCH_ENV, **(env_vars or {}), "HF_HUB_OFFLINE": "1"}
        kwargs.setdefault("security_context", pod_security_context())
        kwargs.setdefault("container_security_context", container_security_context())
        kwargs.setdefault("xcom_sidecar_container_security_context", container_security_context())
        volumes, mounts = list(kwargs.pop("volumes", None) or []), list(kwargs.pop("volume_mounts", None) or [])
        if not any(_field(m, "mount_path", "mountPath") == SCRATCH_PATH for m in mounts):
            volumes.append(_k8s(k8s.V1Volume, name=SCRATCH_VOLUME, empty_dir=_k8s(k8s.V1EmptyDirVolumeSource)))
            mounts.append(_k8s(k8s.V1VolumeMount, name=SCRATCH_VOLUME, mount_path=SCRATCH_PATH))
        kwargs.setdefault("get_logs", True)
        # the runner's lines keep their level: KPO (10.x versions that read a line's leading level) logs each at
        # the level the runner wrote; the formatter drops the word. An older KPO logs them at INFO, word and all.
        if "log_formatter" in kpo_parameters():
            kwargs.setdefault("log_formatter", pod_log_formatter)
        kwargs.setdefault("on_finish_action", "delete_pod")
        # the last lines of the runner's output become the container's termination message (shown on failure)
        kwargs.setdefault("termination_message_policy", "FallbackToLogsOnError")
        super().__init__(
            cmds=list(cmds or POD_RUNNER_CMDS),
            arguments=pod_arguments(arguments),
            env_vars=env,  # a dict: KPO makes the V1EnvVar objects when the pod is built, not at every parse
            do_xcom_push=True,
            volumes=volumes,
            volume_mounts=mounts,
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        log_preemptions(context, self.log)
        if self.group_spec is not None and self.spec_sha256 and self.store:
            from airflow_comfy.operators.local import aws_env_from_connection

            aws_env = aws_env_from_connection(self.aws_conn_id) if self.aws_conn_id else None
            publish_group_spec(self.group_spec, self.spec_sha256, self.store, aws_env=aws_env, log=self.log)
        return self._finished(context, super().execute(context))

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        """A deferred try ends here, not in ``execute``: the same as the end of ``execute``."""
        return self._finished(context, super().trigger_reentry(context, event))

    def _finished(self, context: Any, manifest: Any) -> Any:
        """The manifest the runner left for KPO's xcom sidecar: kept for the extra links (made when the task
        finishes), and the group's metrics sent from it."""
        setattr(self, MANIFEST_ATTRIBUTE, manifest)
        if isinstance(manifest, dict):
            emit_group_metrics(manifest, task_tags(context, self), self.log)
        return manifest

    def on_kill(self) -> None:
        self.log.warning(STOPPED_MESSAGE)
        super().on_kill()

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        # A tier without a class renders to "": no priorityClassName (the cluster's default class applies).
        self.priority_class_name = self.priority_class_name or None
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def cleanup(
        self,
        pod: k8s.V1Pod,
        remote_pod: k8s.V1Pod,
        xcom_result: dict | None = None,
        context: Any = None,
    ) -> None:
        """KPO's own verdict on the finished pod, made non-retryable when the runner exited with code 2.

        Both execution paths end here: ``execute_sync`` (via ``post_complete_action`` in its ``finally``) and
        the deferrable ``trigger_reentry`` (via ``_clean``), each with the finished pod as ``remote_pod``.
        """
        try:
            super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)
        except (AirflowFailException, AirflowSkipException, PodDisrupted):  # PodDisrupted: a new pod in the try
            raise
        except AirflowException:
            code = container_exit_code(remote_pod, self.base_container_name)
            if code is None:  # the container never ended on its own (KPO's message says how the pod did)
                raise
            name = pod.metadata.name if pod is not None and pod.metadata else "?"
            # The termination message: the runner's failure line (/dev/termination-log), else the log's end.
            lines = (termination_message(remote_pod, self.base_container_name) or "").splitlines()
            message = runner_failure(code, lines, where=f"in pod {name}")
            if code == EXIT_BAD_INPUT:
                raise AirflowFailException(message) from None
            raise AirflowException(message) from None


@functools.lru_cache(maxsize=1)
def kpo_parameters() -> frozenset[str]:
    """The keyword arguments the installed KubernetesPodOperator takes."""
    return frozenset(inspect.signature(KubernetesPodOperator.__init__).parameters)


@functools.lru_cache(maxsize=1)
def pod_security_context() -> k8s.V1PodSecurityContext:
    """One object, shared by every group task of the process (KPO copies before it merges; never mutate it).
    The pod's security context: non-root user, group and fsGroup :data:`POD_USER_ID`, RuntimeDefault seccomp."""
    return _k8s(k8s.V1PodSecurityContext,
        run_as_non_root=True, run_as_user=POD_USER_ID, run_as_group=POD_USER_ID, fs_group=POD_USER_ID,
        seccomp_profile=_k8s(k8s.V1SeccompProfile, type="RuntimeDefault"),
    )


@functools.lru_cache(maxsize=1)
def container_security_context() -> k8s.V1SecurityContext:
    """One object, shared by every group task of the process (KPO copies before it merges; never mutate it).
    Each container's: non-root, no privilege escalation, every capability dropped, RuntimeDefault seccomp,
    read-only root filesystem."""
    return _k8s(k8s.V1SecurityContext,
        run_as_non_root=True, run_as_user=POD_USER_ID, run_as_group=POD_USER_ID, privileged=False,
        allow_privilege_escalation=False, read_only_root_filesystem=True,
        capabilities=_k8s(k8s.V1Capabilities, drop=["ALL"]),
        seccomp_profile=_k8s(k8s.V1SeccompProfile, type="RuntimeDefault"),
    )


def _field(obj: Any, attribute: str, key: str) -> Any:
    """A field of a Kubernetes model or of its dict form."""
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, attribute, None)


def termination_message(pod: k8s.V1Pod | None, container_name: str) -> str | None:
    """The termination message of a terminated container of ``pod`` (None when there is none)."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for status in statuses:
        if status.name == container_name and status.state and status.state.terminated:
            return status.state.terminated.message
    return None


def container_exit_code(pod: k8s.V1Pod | None, container_name: str) -> int | None:
    """Exit code of a terminated container of ``pod`` (None when it has not terminated or is unknown)."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for status in statuses:
        if status.name == container_name and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def pod_name(dag_id: str, group: str) -> str:
    """A DNS-1123 label from dag id and group, short enough for KPO's random suffix (which also keeps pods
    of different runs, tries and look-alike names apart)."""
    name = re.sub(r"[^a-z0-9]+", "-", f"{dag_id}-{group}".lower())
    return name[:POD_NAME_MAX].strip("-") or "comfy-group"


def pod_labels(workflow: str, group: str) -> dict[str, str]:
    return {
        APP_LABEL: APP_NAME,
        WORKFLOW_LABEL: make_safe_label_value(workflow),
        GROUP_LABEL: make_safe_label_value(group),
    }


def pod_models_path(settings: ComfySettings) -> str:
    """Where the runner in a pod finds the models folder: ``pod_models_path``, where the models PVC is mounted
    (without ``models_pvc`` the image or a pod template has to provide it there). The worker's
    ``models_path`` means nothing inside a pod."""
    return settings.pod_models_path


def models_volume(settings: ComfySettings) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """The models PVC, mounted read-only at ``pod_models_path`` (nothing when ``models_pvc`` is empty)."""
    if not settings.models_pvc:
        return [], []
    volume = _k8s(k8s.V1Volume,
        name=MODELS_VOLUME,
        persistent_volume_claim=_k8s(k8s.V1PersistentVolumeClaimVolumeSource,
            claim_name=settings.models_pvc, read_only=True
        ),
    )
    mount = _k8s(k8s.V1VolumeMount, name=MODELS_VOLUME, mount_path=settings.pod_models_path, read_only=True)
    return [volume], [mount]


def aws_env_from(settings: ComfySettings) -> list[k8s.V1EnvFromSource]:
    """The ``aws_secret_name`` Secret as the runner container's ``envFrom`` (its keys, e.g.
    ``AWS_ACCESS_KEY_ID``, become environment variables; the values never pass through Airflow)."""
    if not settings.aws_secret_name:
        return []
    return [_k8s(k8s.V1EnvFromSource, secret_ref=_k8s(k8s.V1SecretEnvSource, name=settings.aws_secret_name))]


def resource_requirements(resources: dict[str, dict[str, Any]] | None) -> k8s.V1ResourceRequirements | None:
    if not resources:
        return None
    requests, limits = resources.get("requests"), resources.get("limits")
    return _k8s(k8s.V1ResourceRequirements,
        requests={k: str(v) for k, v in requests.items()} if requests else None,
        limits={k: str(v) for k, v in limits.items()} if limits else None,
    )


def k8s_model(data: dict[str, Any], klass: type[_Model], what: str) -> _Model:
    """A Kubernetes API dict (camelCase, as in a manifest) as a client model object.

    The client's deserializer silently drops fields it does not know, so a misspelled key (or a snake_case
    one) would vanish from the pod: refuse it instead.
    """
    client = ApiClient(configuration=_K8S_CONFIGURATION)
    model = client._ApiClient__deserialize_model(data, klass)  # type: ignore[attr-defined]
    if client.sanitize_for_serialization(model) != data:
        raise ValueError(
            f"{what} {data!r} has fields Kubernetes does not know (use the API's camelCase names, e.g. "
            f"'tolerationSeconds', 'nodeAffinity')"
        )
    return model


def group_pod_kwargs(
    spec: GroupSpec, *, task_config: GroupTaskConfig, settings: ComfySettings, dag_id: str
) -> dict[str, Any]:
    """KubernetesPodOperator arguments of a group's pod, from its task config and the ``[comfy]`` settings."""
    volumes, volume_mounts = models_volume(settings)
    return {
        "image": task_config.image or settings.runner_image,
        "name": pod_name(dag_id, spec.group),
        "namespace": settings.namespace or None,
        "kubernetes_conn_id": settings.kubernetes_conn_id or None,
        "service_account_name": settings.service_account_name or None,
        "image_pull_policy": settings.image_pull_policy or None,
        "labels": pod_labels(spec.workflow_name or dag_id, spec.group),
        "annotations": {WORKFLOW_SHA_ANNOTATION: spec.workflow_sha256} if spec.workflow_sha256 else {},
        "container_resources": resource_requirements(task_config.resources),
        "node_selector": dict(task_config.node_selector),
        "tolerations": [k8s_model(t, k8s.V1Toleration, "toleration") for t in task_config.tolerations],
        "affinity": k8s_model(task_config.affinity, k8s.V1Affinity, "affinity") if task_config.affinity else None,
        "priority_class_name": task_config.priority_class_name,
        "runtime_class_name": task_config.runtime_class_name,
        "env_vars": dict(task_config.env),
        "env_from": aws_env_from(settings),
        "volumes": volumes,
        "volume_mounts": volume_mounts,
        "pod_disruption_restarts": settings.pod_disruption_restarts,
        "avoid_failed_nodes": settings.avoid_failed_nodes,
    }
