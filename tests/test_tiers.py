"""Tiers chosen per run, without a scheduler: the settings, the ``tier`` param and weights of workflow DAGs, the
cluster policy's decisions on the scheduler's own (serialized) DAG objects, the pods' priority class, and the
PriorityClass manifests. The real scheduler is in test_tiers_scheduler.py."""

from __future__ import annotations

import logging
import re
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from airflow.sdk import DAG, BaseOperator, Param
from airflow.serialization.serialized_objects import DagSerialization
from workflow_builders import EXAMPLES, REPO

from airflow_comfy.config import get_settings
from airflow_comfy.factory.loader import load_workflows
from airflow_comfy.operators.render import render_pod_manifests
from airflow_comfy.scheduling import policy
from airflow_comfy.scheduling.tiers import TierError, parse_priority_classes, parse_tiers, tier_param

WEIGHTS = {"vip": 10_000, "high": 1_000, "normal": 100, "batch": 1}
PRIORITY_CLASSES = REPO / "deploy" / "kubernetes" / "priority-classes.yaml"


# --- settings ----------------------------------------------------------------------------------------------------


def test_default_settings():
    settings = get_settings()
    assert settings.tier_weights == WEIGHTS
    assert settings.default_tier == "normal"
    assert settings.tier_classes == {tier: f"airflow-comfy-{tier}" for tier in WEIGHTS}


@pytest.mark.parametrize("text, fragment", [
    ("", "at least one tier"),
    ("vip", "is not 'tier:value'"),
    ("VIP:10", "must be lowercase"),
    ("vip:10,vip:20", "listed twice"),
    ("vip:ten", "must be an integer"),
    ("vip:0", "between 1 and"),
    (f"vip:{2**31}", "between 1 and"),
])
def test_bad_tiers_setting(text: str, fragment: str):
    with pytest.raises(TierError, match=fragment):
        parse_tiers(text)


def test_priority_classes_setting():
    tiers = parse_tiers("urgent:50,normal:1")
    assert parse_priority_classes("urgent: gpu-critical , normal:", tiers) == {"urgent": "gpu-critical"}
    assert parse_priority_classes("", tiers) == {}
    with pytest.raises(TierError, match="'vip' is not a tier"):
        parse_priority_classes("vip:x", tiers)
    with pytest.raises(TierError, match="not a valid Kubernetes object name"):
        parse_priority_classes("urgent:Not_A_Name", tiers)
    with pytest.raises(ValueError, match=r"\[comfy\] default_tier: 'vip' is not a tier"):
        get_settings(tiers="urgent:50,normal:1", priority_classes="", default_tier="vip")


# --- the DAGs the factory builds ------------------------------------------------------------------------------------


def workflow_dags(folder: Path, sidecar: str | None = None, **settings: Any) -> dict[str, DAG]:
    """The DAG of img2img (four tasks: two roots, a fan-in, a tail) with ``sidecar``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLES / "img2img.json", folder / "img2img.json")
    if sidecar is not None:
        (folder / "img2img.comfy.yaml").write_text(textwrap.dedent(sidecar))
    return load_workflows(folder, settings=get_settings(cache_dir="", **settings))


def test_every_task_carries_the_default_tiers_weight_whatever_the_dags_shape(tmp_path: Path):
    dag = workflow_dags(tmp_path, "priority: batch\n")["img2img"]
    assert len(dag.tasks) == 4 and len(dag.roots) == 2
    assert {(task.priority_weight, task.weight_rule) for task in dag.tasks} == {(1, "absolute")}
    tier = dag.params.get_param("tier")
    assert (tier.value, tier.schema["enum"]) == ("batch", list(WEIGHTS))
    # without the policy a run's weights are these, and absolute: the roots do not outrank the tail
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert {task.weight_rule.get_weight(SimpleNamespace(task=task)) for task in serialized.tasks} == {1}


def test_configured_tiers_shape_the_param_and_the_weights(tmp_path: Path):
    dag = workflow_dags(tmp_path, None, tiers="urgent:50000,normal:10,later:2", default_tier="later",
                        priority_classes="urgent:gpu-critical")["img2img"]
    tier = dag.params.get_param("tier")
    assert (tier.value, tier.schema["enum"]) == ("later", ["urgent", "normal", "later"])
    assert {task.priority_weight for task in dag.tasks} == {2}


@pytest.mark.parametrize("sidecar, fragment", [
    ("priority: urgent\n", "priority 'urgent' is not a tier; the tiers ([comfy] tiers) are vip, high, normal, batch"),
    ("params: {tier: '2.text'}\n", "the param name 'tier' is reserved"),
])
def test_sidecar_tier_errors(tmp_path: Path, sidecar: str, fragment: str):
    with pytest.warns(UserWarning, match=re.escape(fragment)):
        assert workflow_dags(tmp_path, sidecar) == {}


# --- the policy ----------------------------------------------------------------------------------------------------


def scheduler_task(dag: DAG, task_id: str):
    """``task_id`` as the scheduler sees it: from the serialized DAG."""
    return DagSerialization.from_dict(DagSerialization.to_dict(dag)).get_task(task_id)


def mutate(task: Any, dag_run: Any, weight: int = -1) -> int:
    ti = SimpleNamespace(task=task, priority_weight=weight)
    policy.task_instance_mutation_hook(task_instance=ti, dag_run=dag_run)
    return ti.priority_weight


@pytest.fixture(scope="module")
def high_dag(tmp_path_factory: pytest.TempPathFactory) -> DAG:
    return workflow_dags(tmp_path_factory.mktemp("high"), "priority: high\n")["img2img"]


@pytest.mark.parametrize("conf, weight", [
    ({"tier": "vip"}, 10_000),
    ({"tier": "batch", "prompt": "a fox"}, 1),
    ({"tier": "normal"}, 100),
    ({}, 1_000),  # no tier chosen: the DAG's default (the sidecar's priority)
    (None, 1_000),
    ({"tier": "urgent"}, 1_000),  # not a tier (the trigger refuses it anyway): the default
    ({"tier": 5}, 1_000),
])
def test_policy_sets_the_runs_tier_weight(high_dag: DAG, conf: Any, weight: int):
    for task in high_dag.tasks:
        assert mutate(scheduler_task(high_dag, task.task_id), SimpleNamespace(conf=conf)) == weight


def test_policy_works_on_a_real_task_instance(high_dag: DAG):
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance

    task = scheduler_task(high_dag, "sample")
    ti = TaskInstance(task, dag_version_id=None, run_id="manual__1")
    assert ti.priority_weight == 1_000  # refresh_from_task: the task's own weight
    policy.task_instance_mutation_hook(task_instance=ti, dag_run=SimpleNamespace(conf={"tier": "vip"}))
    assert ti.priority_weight == 10_000
    # no run given: the run the ORM already holds, never one loaded from the database
    policy.task_instance_mutation_hook(task_instance=ti, dag_run=None)
    assert ti.priority_weight == 10_000  # nothing loaded: untouched
    ti.dag_run = DagRun(dag_id=high_dag.dag_id, run_id="manual__1", conf={"tier": "batch"})
    policy.task_instance_mutation_hook(task_instance=ti, dag_run=None)
    assert ti.priority_weight == 1


def test_policy_leaves_other_dags_and_unknown_tasks_alone():
    with DAG("plain", params={"tier": Param("gold", type="string")}) as free_text, \
            DAG("no_params") as no_params:
        BaseOperator(task_id="a", dag=free_text, priority_weight=7)
        BaseOperator(task_id="a", dag=no_params, priority_weight=7)
    run = SimpleNamespace(conf={"tier": "vip"})
    assert mutate(scheduler_task(free_text, "a"), run) == -1  # a 'tier' param that is no dropdown
    assert mutate(scheduler_task(no_params, "a"), run) == -1
    assert mutate(None, run) == -1  # task not known yet (e.g. verify_integrity's check of existing rows)
    assert mutate(BaseOperator(task_id="loose"), run) == -1  # no DAG


def test_any_dag_opts_in_with_the_tier_param():
    with DAG("ordinary", params={"tier": tier_param("batch", WEIGHTS)}) as dag:
        BaseOperator(task_id="a", weight_rule="absolute", priority_weight=1)
    task = scheduler_task(dag, "a")
    assert mutate(task, SimpleNamespace(conf={"tier": "high"})) == 1_000
    assert mutate(task, SimpleNamespace(conf={})) == 1


def test_policy_never_raises(high_dag: DAG, caplog: pytest.LogCaptureFixture):
    class BrokenRun:
        @property
        def conf(self):
            raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger=policy.__name__):
        assert mutate(scheduler_task(high_dag, "sample"), BrokenRun()) == -1
    assert "could not set the tier weight" in caplog.text


def test_policy_marks_the_hook_active():
    """Without an airflow_local_settings module Airflow leaves ``is_noop`` True for a hook from an entry point,
    and DagRun.verify_integrity then creates task instances without calling it; the policy clears it."""
    from airflow import settings

    hook = settings.task_instance_mutation_hook
    before = hook.is_noop
    try:
        hook.is_noop = True
        policy._mark_hook_active()
        assert hook.is_noop is False
    finally:
        hook.is_noop = before


# --- pods ----------------------------------------------------------------------------------------------------------


class StubTI:
    try_number = 1

    def xcom_pull(self, task_ids: str) -> dict[str, str]:
        return {"manifest_uri": f"file:///store/{task_ids}/manifest.json"}


def rendered_pod(task: Any, params: dict[str, Any]) -> dict[str, Any]:
    task.render_template_fields({"dag": SimpleNamespace(dag_id="img2img"), "run_id": "manual__1", "ti": StubTI(),
                                 "params": params})
    manifest = render_pod_manifests([task])[0]
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    return manifest["spec"]


@pytest.mark.parametrize("tier", list(WEIGHTS))
def test_a_pod_gets_its_runs_tiers_priority_class(tmp_path: Path, tier: str):
    dag = workflow_dags(tmp_path, "backend: kubernetes\npriority: high\n")["img2img"]
    spec = rendered_pod(dag.get_task("sample"), {"tier": tier})
    assert spec["priorityClassName"] == f"airflow-comfy-{tier}"


def test_a_tier_without_a_class_and_the_sidecars_own_class(tmp_path: Path):
    dag = workflow_dags(tmp_path / "a", "backend: kubernetes\n", priority_classes="vip:gpu-critical")["img2img"]
    assert rendered_pod(dag.get_task("sample"), {"tier": "vip"})["priorityClassName"] == "gpu-critical"
    assert "priorityClassName" not in rendered_pod(dag.get_task("prompts"), {"tier": "normal"})
    dag = workflow_dags(tmp_path / "b", "backend: kubernetes\npriority_class_name: always-this\n")["img2img"]
    assert rendered_pod(dag.get_task("sample"), {"tier": "vip"})["priorityClassName"] == "always-this"


# --- the PriorityClass manifests -----------------------------------------------------------------------------------


def test_priority_class_manifests_match_the_default_tiers():
    docs = [doc for doc in yaml.safe_load_all(PRIORITY_CLASSES.read_text(encoding="utf-8")) if doc]
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    assert {doc["kind"] for doc in docs} == {"PriorityClass"}
    by_name = {doc["metadata"]["name"]: doc for doc in docs}
    classes = get_settings().tier_classes
    assert set(by_name) == set(classes.values())
    # the classes rank the tiers as their weights do, and none becomes the cluster's default
    values = [by_name[classes[tier]]["value"] for tier in sorted(WEIGHTS, key=WEIGHTS.get)]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert not any(doc.get("globalDefault") for doc in docs)
    assert by_name["airflow-comfy-batch"]["preemptionPolicy"] == "Never"


@pytest.mark.parametrize(("weight", "resumed"), [
    (1, 2),          # batch: one above its tier, far below normal (100)
    (100, 101),      # normal
    (101, 102),      # preempted twice
    (999, 999),      # one more would reach high (1000): stays
    (1000, 1001),
])
def test_a_preempted_task_goes_up_within_its_tier_never_into_the_next(weight: int, resumed: int):
    from airflow_comfy.scheduling.preemption import preemption_policy

    policy = preemption_policy(get_settings(preemption=True))
    assert policy.vip_weight == 10000 and policy.tier_weights == (1, 100, 1000, 10000)
    assert policy.resume_weight(weight) == resumed


def test_the_workflow_dags_take_airflows_max_active_runs_unless_the_sidecar_sets_one(tmp_path: Path):
    from airflow.configuration import conf

    shutil.copy(EXAMPLES / "txt2img.json", tmp_path / "plain.json")
    shutil.copy(EXAMPLES / "txt2img.json", tmp_path / "limited.json")
    (tmp_path / "limited.comfy.yaml").write_text("max_active_runs: 3\n")
    dags = load_workflows(tmp_path, settings=get_settings(cache_dir=""))
    assert dags["plain"].max_active_runs == conf.getint("core", "max_active_runs_per_dag")
    assert dags["limited"].max_active_runs == 3
