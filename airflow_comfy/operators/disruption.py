"""Pods that Kubernetes takes away, and retries that move away from the nodes that failed.

Within a try: when the cluster evicts or preempts a group's pod (status reason ``Evicted`` or ``Preempting``,
or a ``DisruptionTarget`` condition, which the scheduler, the kubelet, the taint manager, the pod garbage
collector and the eviction API add since Kubernetes 1.26), the operator starts a new pod in the same try, at
most ``[comfy] pod_disruption_restarts`` times; one disruption more fails the try (retryable).

Across tries: a try that fails writes ``runs/<dag>/<run>/<group>/try-<n>/failure.json`` to the artifact store
(XComs of a try are cleared when the next one starts): each failed pod, its node and why. A later try reads the
records of every earlier try of its group, and its pod gets a required node affinity ``kubernetes.io/hostname
NotIn [...]`` for the nodes where a pod was disrupted, lost with its node, or had a container OOMKilled
(``[comfy] avoid_failed_nodes``). A plain failure (the runner's exit 1) moves nothing.

The seam in KubernetesPodOperator (``apache-airflow-providers-cncf-kubernetes`` 10.x): both execution paths
end in ``cleanup(pod, remote_pod)`` when a pod is done (``execute_sync`` from its ``finally``, the deferrable
``trigger_reentry`` from ``_clean``). :class:`PodDisruptionMixin` reads the pod there, lets KPO's cleanup
label it ``already_checked`` and delete it (so that KPO never reattaches to it) and turns KPO's failure into
:class:`PodDisrupted` when the pod was disrupted. ``execute_sync`` and ``trigger_reentry`` catch that and start
a new pod (a new name: KPO adds a random suffix to each pod it builds).
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, TypeVar

from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from airflow_comfy.artifacts.errors import ArtifactNotFound
from airflow_comfy.artifacts.layout import try_failure_key
from airflow_comfy.artifacts.store import ArtifactStore

log = logging.getLogger(__name__)

HOSTNAME_LABEL = "kubernetes.io/hostname"
DISRUPTION_CONDITION = "DisruptionTarget"
#: What a pod's ``status.reason`` or its ``DisruptionTarget`` condition's reason says happened.
_KIND_OF_REASON = {
    "Evicted": "evicted",
    "Preempting": "preempted",
    "PreemptionByScheduler": "preempted",
    "PreemptionByKubeScheduler": "preempted",  # its name before Kubernetes 1.27
    "EvictionByEvictionAPI": "evicted",
    "TerminationByKubelet": "evicted",  # node-pressure eviction, graceful node shutdown
    "DeletionByTaintManager": "disrupted",  # a NoExecute taint, e.g. node.kubernetes.io/unreachable
    "DeletionByPodGC": "disrupted",  # the node is gone
}
DISRUPTION_KINDS = ("evicted", "preempted", "disrupted")
#: Kinds of failure that say something about the node: a later try keeps away from it.
NODE_FAILURE_KINDS = (*DISRUPTION_KINDS, "node_lost", "oom_killed")
_WHAT_HAPPENED = {
    "evicted": "was evicted",
    "preempted": "was preempted",
    "disrupted": "was disrupted",
    "node_lost": "was lost with its node",
    "oom_killed": "had a container killed for running out of memory",
}
#: Where the disruptions of a try travel between deferrals (trigger kwargs come back in the trigger's event).
DISRUPTIONS_KEY = "_comfy_disruptions"
RECORD_FORMAT = "airflow-comfy/try-failure"
_MESSAGE_MAX = 1000

_Model = TypeVar("_Model")


@dataclass(frozen=True)
class PodFailure:
    """How one pod ended, from the pod as the API returned it. ``kind`` is None for a plain failure (e.g. the
    runner's exit code 1), else one of :data:`NODE_FAILURE_KINDS`."""

    pod: str
    node: str | None = None
    phase: str | None = None
    reason: str | None = None
    message: str | None = None
    #: the reason of its ``DisruptionTarget`` condition (PreemptionByScheduler, TerminationByKubelet, ...)
    condition: str | None = None
    exit_code: int | None = None
    kind: str | None = None

    @property
    def disruption(self) -> bool:
        """The cluster took the pod away: start a new one within the try."""
        return self.kind in DISRUPTION_KINDS

    @property
    def node_failure(self) -> bool:
        """A later try keeps away from this pod's node."""
        return self.kind in NODE_FAILURE_KINDS

    def describe(self) -> str:
        what = _WHAT_HAPPENED.get(self.kind or "", "failed")
        why = ", ".join(part for part in (
            f"reason {self.reason}" if self.reason else "",
            f"{DISRUPTION_CONDITION} {self.condition}" if self.condition else "",
            f"exit code {self.exit_code}" if self.exit_code is not None else "",
        ) if part)
        text = f"Pod {self.pod} on node {self.node or '(none)'} {what}"
        if why:
            text += f" ({why})"
        return text + (f": {self.message}" if self.message else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "node_failure": self.node_failure}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PodFailure:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def pod_failure(pod: k8s.V1Pod, container_name: str) -> PodFailure:
    """What ``pod`` (as read from the API) says about how it ended."""
    metadata, spec, status = pod.metadata, pod.spec, pod.status
    name = (metadata.name if metadata else None) or "?"
    node = spec.node_name if spec else None
    if status is None:
        return PodFailure(pod=name, node=node)
    condition = next((c for c in status.conditions or []
                      if c.type == DISRUPTION_CONDITION and str(c.status) == "True"), None)
    statuses = [*(status.init_container_statuses or []), *(status.container_statuses or [])]
    base = next((s for s in statuses if s.name == container_name), None)
    base_end = base.state.terminated if base and base.state else None
    oom = next((s for s in statuses if s.state and s.state.terminated and s.state.terminated.reason == "OOMKilled"),
               None)
    reason, message = status.reason, status.message
    kind = _KIND_OF_REASON.get(reason or "")
    if kind is None and condition is not None:
        kind = _KIND_OF_REASON.get(condition.reason or "", "disrupted")
        message = message or condition.message
    if kind is None and reason == "NodeLost":
        kind = "node_lost"
    if kind is None and oom is not None:
        kind, reason = "oom_killed", "OOMKilled"
        message = message or f"container {oom.name} was OOMKilled (exit code {oom.state.terminated.exit_code})"
    if kind is None and base_end is not None:
        reason = reason or base_end.reason
        message = message or base_end.message
    if message and len(message) > _MESSAGE_MAX:
        message = message[:_MESSAGE_MAX] + "..."
    return PodFailure(pod=name, node=node, phase=status.phase, reason=reason, message=(message or "").strip() or None,
                      condition=condition.reason if condition is not None else None,
                      exit_code=base_end.exit_code if base_end is not None else None, kind=kind)


# --- keeping away from nodes ----------------------------------------------------------------------------------


def avoid_nodes(affinity: k8s.V1Affinity | dict | None, nodes: Sequence[str]) -> k8s.V1Affinity | dict | None:
    """``affinity`` plus the requirement ``kubernetes.io/hostname NotIn nodes``, added to every node selector
    term of its required node affinity (terms are ORed, the expressions of a term ANDed: the pod may go
    wherever it could before, except to those nodes). ``affinity`` is not changed."""
    if not nodes:
        return affinity
    if isinstance(affinity, dict):  # KPO keeps "no affinity" as {}; a pod template may give a dict
        if not affinity:
            affinity = None
        else:
            from kubernetes.client import ApiClient, Configuration

            affinity = ApiClient(configuration=Configuration())._ApiClient__deserialize(  # type: ignore[attr-defined]
                affinity, "V1Affinity")
    merged = copy.deepcopy(affinity) if affinity is not None else k8s.V1Affinity()
    node_affinity = merged.node_affinity or k8s.V1NodeAffinity()
    merged.node_affinity = node_affinity
    required = node_affinity.required_during_scheduling_ignored_during_execution or k8s.V1NodeSelector(
        node_selector_terms=[])
    node_affinity.required_during_scheduling_ignored_during_execution = required
    terms = list(required.node_selector_terms or [])
    if not terms:
        terms = [k8s.V1NodeSelectorTerm()]
    for term in terms:
        term.match_expressions = [*(term.match_expressions or []), k8s.V1NodeSelectorRequirement(
            key=HOSTNAME_LABEL, operator="NotIn", values=sorted(set(nodes)))]
    required.node_selector_terms = terms
    return merged


# --- failure records in the artifact store --------------------------------------------------------------------


def failure_record(*, dag_id: str, run_id: str, group: str, task_id: str, try_number: int, error: BaseException,
                   pods: Sequence[PodFailure]) -> dict[str, Any]:
    """What ``failure.json`` holds: the pods of the try that failed, in order, and the nodes a later try of the
    group keeps away from."""
    text = str(error).strip().splitlines()
    return {
        "format": RECORD_FORMAT,
        "version": 1,
        "dag_id": dag_id,
        "run_id": run_id,
        "group": group,
        "task_id": task_id,
        "try": try_number,
        "failed_at": datetime.datetime.now(tz=datetime.timezone.utc).isoformat(),
        "error": f"{type(error).__name__}: {text[0] if text else ''}"[:_MESSAGE_MAX],
        "retryable": not isinstance(error, AirflowFailException),
        "pods": [p.to_dict() for p in pods],
        "failed_nodes": sorted({p.node for p in pods if p.node_failure and p.node}),
    }


def write_failure_record(store: ArtifactStore, run_key: str, group: str, try_number: int,
                         record: dict[str, Any]) -> str:
    """Write try ``try_number``'s record; returns its URI."""
    return store.put_json(try_failure_key(run_key, group, try_number), record, overwrite=True)


def read_failure_records(store: ArtifactStore, run_key: str, group: str, before_try: int) -> list[dict[str, Any]]:
    """The records of the group's tries ``1 .. before_try - 1`` that failed and wrote one, oldest first."""
    records = []
    for number in range(1, before_try):
        try:
            record = store.get_json(try_failure_key(run_key, group, number))
        except ArtifactNotFound:
            continue
        if isinstance(record, dict) and record.get("format") == RECORD_FORMAT:
            records.append(record)
    return records


def failed_nodes(records: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({str(node) for record in records for node in record.get("failed_nodes") or [] if node})


# --- the operator side ----------------------------------------------------------------------------------------


class PodDisrupted(AirflowException):
    """The pod was evicted or preempted (raised by ``cleanup``; the operator starts a new pod in the try)."""

    def __init__(self, failure: PodFailure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


class PodDisruptionsExhausted(AirflowException):
    """A pod was disrupted again after ``pod_disruption_restarts`` restarts: the try fails (retryable)."""


class _RememberingPodManager(PodManager):
    """KPO's pod manager, remembering the last state it read of each pod: a preempted pod can vanish from the
    API between KPO's last look and the cleanup, and that last look is what says why."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_read: dict[tuple[str, str], k8s.V1Pod] = {}

    def read_pod(self, pod: k8s.V1Pod) -> k8s.V1Pod:
        remote = super().read_pod(pod)
        self.last_read[(pod.metadata.namespace, pod.metadata.name)] = remote
        return remote


class PodDisruptionMixin:
    """For a KubernetesPodOperator subclass (before it in the bases): new pods for disrupted ones within a try,
    failure records at the end of a failed try, and pods that keep away from nodes where earlier tries failed.

    Needs from the operator: ``pod_disruption_restarts``, ``avoid_failed_nodes``, ``store`` (artifact store
    URI; None: no records), ``aws_conn_id``, and ``group_spec`` (its ``group`` names the records' folder).
    """

    pod_disruption_restarts: int = 3
    avoid_failed_nodes: bool = True
    #: Nodes this try's pods keep away from (read from earlier tries' failure records when the try starts).
    failed_nodes: Sequence[str] = ()

    # KubernetesPodOperator's, for the type checker
    log: Any
    pod: Any
    pod_request_obj: Any
    remote_pod: Any
    base_container_name: str
    trigger_kwargs: dict | None
    _killed: bool

    # --- the try ---

    def execute(self, context: Any) -> Any:
        self._begin_try(context, [])
        self._load_failed_nodes(context)
        return self._failure_recorded(context, lambda: super(PodDisruptionMixin, self).execute(context))

    def execute_sync(self, context: Any) -> Any:
        while True:
            try:
                return super().execute_sync(context)  # type: ignore[misc]
            except PodDisrupted as disrupted:
                self._restart_after(disrupted.failure)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        self._begin_try(context, event.get(DISRUPTIONS_KEY) or [])
        return self._failure_recorded(context, lambda: self._reentry(context, event))

    def _reentry(self, context: Any, event: dict[str, Any]) -> Any:
        try:
            return super().trigger_reentry(context, event)  # type: ignore[misc]
        except PodDisrupted as disrupted:
            self._restart_after(disrupted.failure)
            self.trigger_kwargs = {**(self.trigger_kwargs or {}),
                                   DISRUPTIONS_KEY: [p.to_dict() for p in self._disruptions]}
            self._load_failed_nodes(context)  # a resumed task is a new operator object: read them again
            self.execute_async(context)  # type: ignore[attr-defined]  # creates the new pod and defers

    def _begin_try(self, context: Any, disruptions: list[dict[str, Any]]) -> None:
        """Called when the try starts, and again on each resume after a deferral (a fresh operator object,
        which gets the try's disruptions so far back from the trigger's event)."""
        self._disruptions: list[PodFailure] = [PodFailure.from_dict(d) for d in disruptions]
        self._failed_pod: PodFailure | None = None
        if disruptions:  # and KPO's own re-deferrals pass them on
            self.trigger_kwargs = {**(self.trigger_kwargs or {}), DISRUPTIONS_KEY: list(disruptions)}

    def _load_failed_nodes(self, context: Any) -> None:
        """Before building a pod: the nodes where earlier tries of the group failed."""
        self.failed_nodes = self._read_failed_nodes(context) if self.avoid_failed_nodes else ()

    def _restart_after(self, failure: PodFailure) -> None:
        """A new pod for the disrupted one, or the try's end when it was the disruption too many."""
        self._disruptions.append(failure)
        restarts = len(self._disruptions) - 1
        if restarts >= self.pod_disruption_restarts:
            message = (f"{failure.describe()}\nThat is {len(self._disruptions)} disrupted pod(s) in this try and "
                       f"{self.pod_disruption_restarts} restart(s) allowed ([comfy] pod_disruption_restarts): the try "
                       "fails (Airflow retries it if the task has retries left).")
            self.log.error("%s", message)
            raise PodDisruptionsExhausted(message) from None
        self.log.warning("%s\nStarting a new pod in this try (restart %d of at most %d).", failure.describe(),
                         restarts + 1, self.pod_disruption_restarts)
        # KPO builds and creates a new pod when these are unset; its cleanup has labelled the old one
        # already_checked (and deleted it), so it never reattaches to it
        self.pod = None
        self.pod_request_obj = None
        self.remote_pod = None
        self.__dict__.pop("pod_manager", None)

    # --- the pod ---

    @cached_property
    def pod_manager(self) -> PodManager:
        return _RememberingPodManager(kube_client=self.client, callbacks=self.callbacks)  # type: ignore[attr-defined]

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        pod = super().build_pod_request_obj(context, dry_run=dry_run)  # type: ignore[misc]
        if self.failed_nodes:
            pod.spec.affinity = avoid_nodes(pod.spec.affinity, self.failed_nodes)
        return pod

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, xcom_result: dict | None = None,
                context: Any = None) -> None:
        """KPO's cleanup of the finished pod, given its current state; its failure becomes :class:`PodDisrupted`
        when the cluster evicted or preempted the pod."""
        if self._killed or not remote_pod:
            return super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result,  # type: ignore[misc]
                                   context=context)
        current = self._current_state(remote_pod)
        try:
            super().cleanup(pod=pod, remote_pod=current, xcom_result=xcom_result, context=context)  # type: ignore[misc]
        except (AirflowFailException, AirflowSkipException):
            raise
        except AirflowException:
            failure = pod_failure(current, self.base_container_name)
            if failure.disruption:
                raise PodDisrupted(failure) from None
            self._failed_pod = failure
            raise

    def _current_state(self, remote_pod: k8s.V1Pod) -> k8s.V1Pod:
        """The pod as the API has it now; if it is gone, as KPO last read it."""
        try:
            return self.pod_manager.read_pod(remote_pod)
        except ApiException as exc:
            if exc.status != 404:
                self.log.warning("Could not read pod %s: %s", remote_pod.metadata.name, exc.reason)
        except Exception as exc:  # the cleanup goes on with what KPO had
            self.log.warning("Could not read pod %s: %s", remote_pod.metadata.name, exc)
        manager = self.pod_manager
        seen = manager.last_read.get((remote_pod.metadata.namespace, remote_pod.metadata.name)) if isinstance(
            manager, _RememberingPodManager) else None
        if seen is not None:
            self.log.info("Pod %s is gone; its last state read: phase %s, reason %s", remote_pod.metadata.name,
                          seen.status.phase if seen.status else None, seen.status.reason if seen.status else None)
        return seen or remote_pod

    # --- failure records ---

    def _failure_recorded(self, context: Any, body: Callable[[], Any]) -> Any:
        """``body()``; when it fails, the try's failure record is written before the error goes on."""
        try:
            return body()
        except AirflowSkipException:
            raise
        except Exception as error:
            self._record_failure(context, error)
            raise

    def _record_place(self, context: Any) -> tuple[str, str, str, int] | None:
        store = getattr(self, "store", None)
        ti = context.get("ti") if context else None
        if not store or ti is None:
            return None
        spec = getattr(self, "group_spec", None)
        group = spec.group if spec is not None else ti.task_id
        return store, f"{ti.dag_id}/{context['run_id']}", group, int(ti.try_number)

    def _open_store(self, store_uri: str) -> ArtifactStore:
        from airflow_comfy.operators.local import aws_env_from_connection
        from airflow_comfy.operators.spec_publish import open_task_store

        conn_id = getattr(self, "aws_conn_id", None)
        return open_task_store(store_uri, aws_env=aws_env_from_connection(conn_id) if conn_id else None)

    def _record_failure(self, context: Any, error: Exception) -> None:
        place = self._record_place(context)
        if place is None:
            return
        store_uri, run_key, group, try_number = place
        pods = [*getattr(self, "_disruptions", []), *([self._failed_pod] if getattr(self, "_failed_pod", None)
                                                       else [])]
        record = failure_record(dag_id=context["ti"].dag_id, run_id=context["run_id"], group=group,
                                task_id=context["ti"].task_id, try_number=try_number, error=error, pods=pods)
        from airflow_comfy.operators.spec_publish import quiet_aws_logs

        try:
            with quiet_aws_logs():
                uri = write_failure_record(self._open_store(store_uri), run_key, group, try_number, record)
        except Exception as exc:  # never hide the try's own error
            self.log.warning("Could not write the failure record of try %d: %s", try_number, exc)
            return
        self.log.info("Failure record: %s (nodes a retry keeps away from: %s)", uri,
                      ", ".join(record["failed_nodes"]) or "none")

    def _read_failed_nodes(self, context: Any) -> list[str]:
        place = self._record_place(context)
        if place is None or place[3] <= 1:
            return []
        store_uri, run_key, group, try_number = place
        from airflow_comfy.operators.spec_publish import quiet_aws_logs

        try:
            with quiet_aws_logs():
                records = read_failure_records(self._open_store(store_uri), run_key, group, try_number)
        except Exception as exc:  # the try still runs, only without moving
            self.log.warning("Could not read the failure records of earlier tries: %s", exc)
            return []
        nodes = failed_nodes(records)
        if nodes:
            self.log.info("Earlier tries of group %s failed on node(s) %s: this try's pods keep away from them "
                          "(required node affinity %s NotIn)", group, ", ".join(nodes), HOSTNAME_LABEL)
        return nodes
