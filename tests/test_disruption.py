"""Pods that the cluster evicts or preempts, failure records, and retries that move away from failed nodes.

Pods are what a Kubernetes API returns: JSON documents deserialized by the kubernetes client (``pod_document``
in ``k8s_server``). The end-to-end part is a real Airflow run (``dag.test()``: Airflow's task runner, its
retries, XCom, triggers run in line) whose ComfyGroupPodOperator tasks talk, through the kubernetes clients and
an Airflow connection, to a fake Kubernetes API server on 127.0.0.1 (``k8s_server``): KPO's own code creates,
watches, reads logs of, execs into (xcom) and deletes the pods, on both its sync and deferrable paths.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from dag_test_run import dag_test_result
from k8s_server import FakeCluster, fake_kubernetes, kubeconfig, pod_document
from kubernetes.client import ApiClient, Configuration
from kubernetes.client import models as k8s
from test_operators import GPU_TASK, airflow_env, encode_spec, pod_task, settings

from airflow_comfy.artifacts.layout import try_failure_key
from airflow_comfy.artifacts.store import open_store
from airflow_comfy.config import get_settings
from airflow_comfy.operators import build_group_task
from airflow_comfy.operators.disruption import (
    HOSTNAME_LABEL,
    avoid_nodes,
    failed_nodes,
    failure_record,
    pod_failure,
    read_failure_records,
    write_failure_record,
)
from airflow_comfy.operators.render import render_pod_manifests
from airflow_comfy.operators.task_config import GroupTaskConfig

SCHEMA_VERSIONS = ("1.30.0", "1.37.0")


def api_pod(document: dict[str, Any]) -> k8s.V1Pod:
    """A pod document as the kubernetes client turns an API response into a V1Pod."""
    return ApiClient(configuration=Configuration())._ApiClient__deserialize(document, "V1Pod")


def not_in_expressions(affinity: dict[str, Any] | None) -> list[list[str]]:
    """The hostname NotIn values of each required node selector term of a manifest's affinity."""
    required = (((affinity or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    return [next((e["values"] for e in term.get("matchExpressions") or []
                  if e["key"] == HOSTNAME_LABEL and e["operator"] == "NotIn"), [])
            for term in required.get("nodeSelectorTerms") or []]


# --- what a pod says about how it ended ------------------------------------------------------------------------


def test_evicted_pod():
    failure = pod_failure(api_pod(pod_document("evicted", name="wf-sample-1", node="gpu-node-a")), "base")
    assert (failure.kind, failure.disruption, failure.node_failure) == ("evicted", True, True)
    assert (failure.pod, failure.node, failure.phase, failure.reason) == ("wf-sample-1", "gpu-node-a", "Failed",
                                                                          "Evicted")
    assert failure.condition == "TerminationByKubelet" and failure.exit_code == 137
    assert failure.message.startswith("The node was low on resource: memory.")
    text = failure.describe()
    assert text.startswith("Pod wf-sample-1 on node gpu-node-a was evicted (reason Evicted, DisruptionTarget "
                           "TerminationByKubelet, exit code 137): The node was low on resource: memory.")


def test_preempted_pod():
    document = pod_document("preempted", name="wf-sample-2", node="gpu-node-b")
    assert document["metadata"]["deletionTimestamp"] and "reason" not in document["status"]
    failure = pod_failure(api_pod(document), "base")
    assert (failure.kind, failure.disruption, failure.reason, failure.condition, failure.exit_code) == (
        "preempted", True, None, "PreemptionByScheduler", 137)
    assert "was preempted (DisruptionTarget PreemptionByScheduler, exit code 137): default-scheduler: preempting" in (
        failure.describe())


def test_oom_killed_pod_is_a_node_failure_but_no_disruption():
    # the runner was OOMKilled; KPO's xcom sidecar still runs (phase Running) until KPO stops it
    failure = pod_failure(api_pod(pod_document("oom_killed", sidecar_stopped=False)), "base")
    assert (failure.kind, failure.disruption, failure.node_failure) == ("oom_killed", False, True)
    assert (failure.phase, failure.reason, failure.exit_code) == ("Running", "OOMKilled", 137)
    assert "container base was OOMKilled" in failure.describe()


@pytest.mark.parametrize(("outcome", "exit_code", "phase"), [("exit_1", 1, "Failed"), ("exit_2", 2, "Failed"),
                                                             ("success", 0, "Succeeded")])
def test_plain_endings_are_no_node_failure(outcome: str, exit_code: int, phase: str):
    failure = pod_failure(api_pod(pod_document(outcome)), "base")
    assert (failure.kind, failure.disruption, failure.node_failure) == (None, False, False)
    assert (failure.exit_code, failure.phase) == (exit_code, phase)
    if outcome == "exit_2":
        assert failure.message == "error: node 3 (KSampler), input 'seed': must be an integer"


def test_lost_node_and_other_disruption_reasons():
    lost = pod_document("exit_1")
    lost["status"].update(phase="Failed", reason="NodeLost",
                          message="Node gpu-node-a which was running pod wf-sample-abcd1234 is unresponsive")
    failure = pod_failure(api_pod(lost), "base")
    assert (failure.kind, failure.disruption, failure.node_failure) == ("node_lost", False, True)
    for reason, kind in (("DeletionByTaintManager", "disrupted"), ("EvictionByEvictionAPI", "evicted"),
                         ("DeletionByPodGC", "disrupted"), ("SomethingNew", "disrupted")):
        document = pod_document("preempted")
        document["status"]["conditions"][0]["reason"] = reason
        assert pod_failure(api_pod(document), "base").kind == kind
    stale = pod_document("preempted")
    stale["status"]["conditions"][0]["status"] = "False"  # a condition that no longer holds
    assert pod_failure(api_pod(stale), "base").kind is None


# --- keeping away from nodes ------------------------------------------------------------------------------------


def test_avoid_nodes_is_added_to_every_required_term():
    affinity = api_pod({"spec": {"affinity": GPU_TASK.affinity, "containers": []}}).spec.affinity
    affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms.append(
        k8s.V1NodeSelectorTerm(match_fields=[k8s.V1NodeSelectorRequirement(
            key="metadata.name", operator="In", values=["gpu-node-x"])]))
    before = copy.deepcopy(affinity)
    merged = ApiClient().sanitize_for_serialization(avoid_nodes(affinity, ["gpu-node-b", "gpu-node-a"]))
    assert affinity == before  # not changed in place
    terms = merged["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [
        {"key": "gpu-mem-gb", "operator": "Gt", "values": ["20"]},
        {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": ["gpu-node-a", "gpu-node-b"]},
    ]
    assert terms[1]["matchFields"] and terms[1]["matchExpressions"] == [
        {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": ["gpu-node-a", "gpu-node-b"]}]
    assert merged["podAntiAffinity"] == GPU_TASK.affinity["podAntiAffinity"]
    for nothing in (None, {}):
        only = ApiClient().sanitize_for_serialization(avoid_nodes(nothing, ["n1"]))
        assert only == {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "NotIn", "values": ["n1"]}]}]}}}
    assert avoid_nodes(affinity, []) is affinity


def test_failure_records_round_trip(tmp_path: Path):
    store = open_store(tmp_path)
    run_key = "wf/manual__2026-11-25T12:00:00+00:00"
    evicted = pod_failure(api_pod(pod_document("evicted", node="gpu-node-a")), "base")
    plain = pod_failure(api_pod(pod_document("exit_1", node="gpu-node-c")), "base")
    record = failure_record(dag_id="wf", run_id="manual__1", group="sample", task_id="sample", try_number=1,
                            error=RuntimeError("boom\nmore"), pods=[evicted, plain])
    assert record["failed_nodes"] == ["gpu-node-a"] and record["error"] == "RuntimeError: boom"
    uri = write_failure_record(store, run_key, "sample", 1, record)
    assert uri.endswith("/sample/try-1/failure.json") and try_failure_key(run_key, "sample", 1) in uri
    assert read_failure_records(store, run_key, "sample", 1) == []  # nothing before try 1
    records = read_failure_records(store, run_key, "sample", 3)  # try 2 wrote none
    assert len(records) == 1 and records[0]["pods"][0]["kind"] == "evicted"
    write_failure_record(store, run_key, "sample", 2, {**record, "failed_nodes": ["gpu-node-b"]})
    assert failed_nodes(read_failure_records(store, run_key, "sample", 3)) == ["gpu-node-a", "gpu-node-b"]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_retry_pod_spec_keeps_away_and_validates(version: str, tmp_path: Path):
    """The next try's pod, built by the operator's own build_pod_request_obj (as render_pod_manifest does) from
    the failure records of earlier tries, validates against the Kubernetes schema."""
    store = open_store(tmp_path)
    oom = pod_failure(api_pod(pod_document("oom_killed", node="gpu-node-a")), "base")
    write_failure_record(store, "wf/run1", "sample", 1, failure_record(
        dag_id="wf", run_id="run1", group="sample", task_id="sample", try_number=1, error=RuntimeError("x"),
        pods=[oom]))
    for config in (GPU_TASK, GroupTaskConfig(backend="kubernetes")):
        task = pod_task(config)
        task.failed_nodes = failed_nodes(read_failure_records(store, "wf/run1", "sample", 2))
        manifest = render_pod_manifests([task])[0]
        kubernetes_validate.validate(manifest, version, strict=True)
        assert not_in_expressions(manifest["spec"].get("affinity")) == [["gpu-node-a"]]
        assert (render_pod_manifests([pod_task(config)])[0]["spec"].get("affinity") or None) == config.affinity


# --- the pod settings ---------------------------------------------------------------------------------------------


def test_pod_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    defaults = build_group_task(encode_spec(), task_config=GroupTaskConfig(backend="kubernetes"),
                                settings=settings(), upstream_task_ids=[])
    assert (defaults.pod_disruption_restarts, defaults.avoid_failed_nodes) == (3, True)
    monkeypatch.setenv("AIRFLOW__COMFY__POD_DISRUPTION_RESTARTS", "1")
    monkeypatch.setenv("AIRFLOW__COMFY__AVOID_FAILED_NODES", "false")
    comfy = get_settings()
    assert (comfy.pod_disruption_restarts, comfy.avoid_failed_nodes) == (1, False)
    task = build_group_task(encode_spec(), task_config=GroupTaskConfig(backend="kubernetes"), settings=comfy,
                            upstream_task_ids=[])
    assert (task.pod_disruption_restarts, task.avoid_failed_nodes) == (1, False)
    for name, value, message in (("POD_DISRUPTION_RESTARTS", "-1", "must not be negative"),
                                 ("AVOID_FAILED_NODES", "maybe", "must be true or false")):
        monkeypatch.setenv(f"AIRFLOW__COMFY__{name}", value)
        with pytest.raises(ValueError, match=message):
            get_settings()
        monkeypatch.delenv(f"AIRFLOW__COMFY__{name}")


# --- a real Airflow run against the fake Kubernetes API ------------------------------------------------------------

NODES = {"gpu-node-a": {"gpu-mem-gb": "24"}, "cpu-node-c": {"gpu-mem-gb": "0"}, "gpu-node-b": {"gpu-mem-gb": "48"}}
CONN_ID = "comfy_fake_k8s"
#: task id -> (outcomes of its pods in creation order, task config, deferrable)
TASKS: dict[str, tuple[list[str], dict[str, Any], bool]] = {
    "evicted_then_ok": (["evicted", "success"], {}, False),
    "preempted_gone_then_ok": (["preempted_gone", "success"], {}, False),
    "evicted_beyond_bound": (["evicted"] * 4 + ["success"], {"retries": 1, "affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "gpu-mem-gb", "operator": "Gt", "values": ["20"]}]}]}}}}, False),
    "oom_then_moves": (["oom_killed", "success"], {"retries": 1}, False),
    "fails_plain": (["exit_1", "exit_1"], {"retries": 1}, False),
    "bad_input": (["exit_2"], {"retries": 2}, False),
    "deferred_evicted_then_ok": (["evicted", "success"], {}, True),
    "deferred_beyond_bound": (["preempted", "evicted", "preempted", "evicted", "success"], {"retries": 1}, True),
}

DAG_FILE = r'''
"""Group pod tasks that the fake Kubernetes API evicts, preempts, OOM-kills..., run with dag.test()."""
import json, pathlib
from airflow.sdk import DAG
from airflow_comfy.config import get_settings
from airflow_comfy.operators import build_group_task, GroupTaskConfig
from airflow_comfy.workflow.groupspec import GroupSpec

home = pathlib.Path(__file__).resolve().parent.parent
payload = json.loads((home / "payload.json").read_text())
settings = get_settings(artifact_store=f"file://{home}/artifacts", backend="kubernetes", namespace="comfy",
                        kubernetes_conn_id=payload["conn_id"], models_pvc="", service_account_name="")
with DAG("comfy_disruption_test", schedule=None) as dag:
    for name, item in payload["tasks"].items():
        config = GroupTaskConfig(backend="kubernetes", retry_delay_seconds=0, **item["config"])
        task = build_group_task(GroupSpec.from_dict(item["spec"]), task_config=config, settings=settings,
                                upstream_task_ids=[], task_id=name)
        task.deferrable = item["deferrable"]  # what [operators] default_deferrable = True would give every task

if __name__ == "__main__":
    from airflow.utils import db

    db.upgradedb()
    run = dag.test()
    states = {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number} for ti in run.get_task_instances()}
    print("RESULT " + json.dumps({"run_id": run.run_id, "state": str(run.state), "tasks": states}))
'''


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory):
    """The fake cluster (in this process) and the dag.test() run (a background subprocess) that uses it."""
    home = tmp_path_factory.mktemp("airflow_home")
    cluster = FakeCluster(nodes=NODES, outcomes={name: list(outcomes) for name, (outcomes, _, _) in TASKS.items()})
    tasks = {}
    for name, (_, config, deferrable) in TASKS.items():
        spec = encode_spec()
        spec.group = name
        tasks[name] = {"spec": spec.to_dict(), "config": config, "deferrable": deferrable}
    (home / "payload.json").write_text(json.dumps({"tasks": tasks, "conn_id": CONN_ID}))
    (home / "dags").mkdir()
    dag_file = home / "dags" / "comfy_disruption_test.py"
    dag_file.write_text(DAG_FILE)
    with fake_kubernetes(cluster) as url:
        env = {**airflow_env(home), f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig(url)}})}
        with open(home / "output.log", "w") as output:
            proc = subprocess.Popen([sys.executable, str(dag_file)], env=env, stdout=output, stderr=subprocess.STDOUT,
                                    cwd=home)
        try:
            yield proc, home, cluster
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_cluster_run_early(request: pytest.FixtureRequest) -> None:
    """Start the slow Airflow run before this module's fast tests (when a selected test needs it)."""
    if any("airflow_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("cluster_run")


@pytest.fixture(scope="module")
def airflow_run(cluster_run: tuple[subprocess.Popen, Path, FakeCluster]) -> dict[str, Any]:
    proc, home, cluster = cluster_run
    result = dag_test_result(proc, home, timeout=400)
    assert not cluster.errors, cluster.errors
    result.update(cluster=cluster, store=open_store(home / "artifacts"))
    return result


def _record(run: dict[str, Any], group: str, try_number: int) -> dict[str, Any]:
    return run["store"].get_json(try_failure_key(f"comfy_disruption_test/{run['run_id']}", group, try_number))


def _has_record(run: dict[str, Any], group: str, try_number: int) -> bool:
    return run["store"].exists(try_failure_key(f"comfy_disruption_test/{run['run_id']}", group, try_number))


def _tries(pods: list[dict[str, Any]]) -> list[str]:
    return [p["metadata"]["labels"]["try_number"] for p in pods]


def _log_lines(run: dict[str, Any], needle: str) -> list[str]:
    return [line for line in run["output"].splitlines() if needle in line]


@pytest.mark.airflow
@pytest.mark.parametrize("task_id", ["evicted_then_ok", "deferred_evicted_then_ok"])
def test_evicted_pod_is_replaced_within_the_try(airflow_run: dict[str, Any], task_id: str):
    assert airflow_run["tasks"][task_id] == {"state": "success", "try_number": 1}
    cluster = airflow_run["cluster"]
    pods = cluster.pods_of(task_id)
    assert len(pods) == 2 and _tries(pods) == ["1", "1"]  # a second pod, in the same try
    first, second = (p["metadata"]["name"] for p in pods)
    assert first != second and first in cluster.deleted and second in cluster.deleted
    # KPO's cleanup marked the disrupted pod before deleting it: nothing reattaches to it
    assert cluster.pods[("comfy", first)].body["metadata"]["labels"]["already_checked"] == "True"
    said = _log_lines(airflow_run, f"Pod {first} on node gpu-node-a was evicted (reason Evicted, DisruptionTarget "
                                   "TerminationByKubelet, exit code 137): The node was low on resource: memory.")
    assert said, f"no eviction line for {first}"
    assert "Starting a new pod in this try (restart 1 of at most 3)." in airflow_run["output"]
    assert not _has_record(airflow_run, task_id, 1)  # the try did not fail
    assert not any(any(not_in_expressions(p["spec"].get("affinity"))) for p in pods)  # restarts do not move


@pytest.mark.airflow
def test_preempted_pod_that_vanished_is_replaced(airflow_run: dict[str, Any]):
    assert airflow_run["tasks"]["preempted_gone_then_ok"] == {"state": "success", "try_number": 1}
    pods = airflow_run["cluster"].pods_of("preempted_gone_then_ok")
    assert len(pods) == 2 and _tries(pods) == ["1", "1"]
    first = pods[0]["metadata"]["name"]
    assert _log_lines(airflow_run, f"Pod {first} is gone; its last state read: phase Failed")
    assert _log_lines(airflow_run, f"Pod {first} on node gpu-node-a was preempted (DisruptionTarget "
                                   "PreemptionByScheduler, exit code 137): default-scheduler: preempting")


@pytest.mark.airflow
@pytest.mark.parametrize("task_id", ["evicted_beyond_bound", "deferred_beyond_bound"])
def test_disruptions_beyond_the_bound_fail_the_try_and_the_retry_moves(airflow_run: dict[str, Any], task_id: str):
    assert airflow_run["tasks"][task_id] == {"state": "success", "try_number": 2}
    cluster = airflow_run["cluster"]
    pods = cluster.pods_of(task_id)
    assert _tries(pods) == ["1", "1", "1", "1", "2"]  # 3 restarts in try 1, then the retry
    assert "disrupted pod(s) in this try and 3 restart(s) allowed" in airflow_run["output"]
    record = _record(airflow_run, task_id, 1)
    assert record["retryable"] is True and record["error"].startswith("PodDisruptionsExhausted: ")
    assert [p["pod"] for p in record["pods"]] == [p["metadata"]["name"] for p in pods[:4]]
    assert {p["kind"] for p in record["pods"]} <= {"evicted", "preempted"} and record["failed_nodes"] == ["gpu-node-a"]
    assert not _has_record(airflow_run, task_id, 2)
    # try 1 went where the scheduler put it; try 2 keeps away from gpu-node-a, still under the task's own affinity
    assert not any(any(not_in_expressions(p["spec"].get("affinity"))) for p in pods[:4])
    retry = pods[4]
    assert not_in_expressions(retry["spec"]["affinity"]) == [["gpu-node-a"]]
    if task_id == "evicted_beyond_bound":
        terms = retry["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0] == {
            "key": "gpu-mem-gb", "operator": "Gt", "values": ["20"]}
    # not gpu-node-a; the first task's own affinity also keeps it off cpu-node-c, the other has none
    expected = "gpu-node-b" if task_id == "evicted_beyond_bound" else "cpu-node-c"
    assert cluster.pods[("comfy", retry["metadata"]["name"])].node == expected
    for version in SCHEMA_VERSIONS:  # the pod exactly as KPO sent it to the API
        kubernetes_validate.validate(retry, version, strict=True)
    assert _log_lines(airflow_run, "Earlier tries of group " + task_id + " failed on node(s) gpu-node-a")


@pytest.mark.airflow
def test_oom_killed_try_fails_and_the_retry_moves(airflow_run: dict[str, Any]):
    assert airflow_run["tasks"]["oom_then_moves"] == {"state": "success", "try_number": 2}
    pods = airflow_run["cluster"].pods_of("oom_then_moves")
    assert _tries(pods) == ["1", "2"]
    record = _record(airflow_run, "oom_then_moves", 1)
    assert [(p["kind"], p["reason"], p["exit_code"], p["node"]) for p in record["pods"]] == [
        ("oom_killed", "OOMKilled", 137, "gpu-node-a")]
    assert record["failed_nodes"] == ["gpu-node-a"] and record["retryable"] is True
    assert not_in_expressions(pods[1]["spec"]["affinity"]) == [["gpu-node-a"]]
    assert airflow_run["cluster"].pods[("comfy", pods[1]["metadata"]["name"])].node == "cpu-node-c"


@pytest.mark.airflow
def test_plain_failure_is_retried_where_it_was(airflow_run: dict[str, Any]):
    assert airflow_run["tasks"]["fails_plain"] == {"state": "failed", "try_number": 2}
    pods = airflow_run["cluster"].pods_of("fails_plain")
    assert _tries(pods) == ["1", "2"] and all(not p["spec"].get("affinity") for p in pods)
    for number in (1, 2):
        record = _record(airflow_run, "fails_plain", number)
        assert record["failed_nodes"] == [] and record["retryable"] is True
        assert [(p["kind"], p["exit_code"]) for p in record["pods"]] == [(None, 1)]


@pytest.mark.airflow
def test_bad_input_is_not_retried(airflow_run: dict[str, Any]):
    assert airflow_run["tasks"]["bad_input"] == {"state": "failed", "try_number": 1}
    assert len(airflow_run["cluster"].pods_of("bad_input")) == 1
    assert "refused its input (exit code 2; not retried)" in airflow_run["output"]
    record = _record(airflow_run, "bad_input", 1)
    assert record["retryable"] is False and record["error"].startswith("AirflowFailException: ")
    assert [(p["kind"], p["exit_code"]) for p in record["pods"]] == [(None, 2)]


@pytest.mark.airflow
def test_every_pod_was_cleaned_up(airflow_run: dict[str, Any]):
    cluster = airflow_run["cluster"]
    left = [name for (_, name), pod in cluster.pods.items() if not pod.gone]
    assert not left, left
    assert sum(len(outcomes) for outcomes, _, _ in TASKS.values()) == len(cluster.created)
    assert os.path.isdir(Path(airflow_run["store"].root_uri[len("file://"):]) / "runs")
