"""Operators: the runner command, the group pod (rendered offline and schema-validated), the local subprocess
(with a fake runner), exit-code semantics, and templates rendered by a real Airflow run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from dag_test_run import dag_test_result
from kubernetes.client import models as k8s

from airflow_comfy.artifacts.specs import publish_spec, read_spec_bytes
from airflow_comfy.artifacts.store import open_store
from airflow_comfy.config import get_settings
from airflow_comfy.operators import build_group_task
from airflow_comfy.operators.command import (
    EXIT_BAD_INPUT,
    PARAMS_TEMPLATE,
    POD_XCOM_PATH,
    RUN_KEY_TEMPLATE,
    TRY_TEMPLATE,
    inputs_template,
    runner_arguments,
)
from airflow_comfy.operators.local import ComfyGroupLocalOperator
from airflow_comfy.operators.pod import ComfyGroupPodOperator, container_exit_code, pod_name
from airflow_comfy.operators.render import render_pod_manifests, to_yaml
from airflow_comfy.operators.task_config import GroupTaskConfig
from airflow_comfy.workflow.groupspec import BoundaryValue, GroupSpec, ParamBinding, PersistedValue

TRICKY_PROMPT = "a cat, {{ not jinja }} {% raw %} $HOME `ls` 'quoted' \"double\" <tag> & ünïcode"
SCHEMA_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
GPU_TASK = GroupTaskConfig(
    backend="kubernetes",
    image="registry.example.com/comfy-runner:1.2.3",
    priority_weight=10,
    retries=3,
    retry_exponential_backoff=True,
    resources={"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}},
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
    tolerations=(
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60},
    ),
    affinity={
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu-mem-gb", "operator": "Gt", "values": ["20"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "airflow-comfy"}},
                    },
                }
            ]
        },
    },
    priority_class_name="comfy-vip",
    env={"COMFY_LOG_LEVEL": "debug"},
)


# --- group specs, built by hand ---------------------------------------------------------------------------


def encode_spec(prompt: str = TRICKY_PROMPT) -> GroupSpec:
    return GroupSpec(
        workflow_name="txt2img_SDXL.demo",
        workflow_sha256="0" * 64,
        group="encode",
        nodes={
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        },
        recipe_nodes=["4"],
        components={"4": ["CLIP"]},
        persist=[PersistedValue(node="6", output=0, type="CONDITIONING", consumers=("sample",))],
        params={"prompt": [ParamBinding(node="6", input="text")]},
    )


def sample_spec() -> GroupSpec:
    return GroupSpec(
        workflow_name="txt2img_SDXL.demo",
        workflow_sha256="0" * 64,
        group="sample",
        nodes={
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "3": {
                "class_type": "KSampler",
                "inputs": {
                    "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                    "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
                    "latent_image": ["5", 0],
                },
            },
        },
        recipe_nodes=["4"],
        components={"4": ["MODEL"]},
        boundary_inputs=[BoundaryValue(node="6", output=0, type="CONDITIONING", group="encode")],
        persist=[PersistedValue(node="3", output=0, type="LATENT", consumers=("decode",))],
        params={"seed": [ParamBinding(node="3", input="seed")]},
        upstream=["encode"],
    )


def settings(tmp: Path | None = None, **overrides: Any):
    base = Path(tmp) if tmp else Path("/srv/comfy")
    values = {
        "artifact_store": f"file://{base}/artifacts",
        "models_path": f"{base}/models",
        "input_path": f"{base}/input",
        "runner_python": "",
        "namespace": "comfy",
        "kubernetes_conn_id": "kubernetes_default",
        "service_account_name": "comfy-runner",
        "models_pvc": "comfy-models",
        "pod_models_path": "/models",
        "default_pool": "default_pool",
    }
    values.update(overrides)
    return get_settings(**values)


def pod_task(config: GroupTaskConfig = GPU_TASK, **setting_overrides: Any) -> ComfyGroupPodOperator:
    task = build_group_task(
        sample_spec(), task_config=config, settings=settings(**setting_overrides), upstream_task_ids=["encode"]
    )
    assert isinstance(task, ComfyGroupPodOperator)
    return task


def option(arguments: list[str], flag: str) -> list[str]:
    return [arguments[i + 1] for i, arg in enumerate(arguments) if arg == flag]


# --- the runner command -------------------------------------------------------------------------------------


def test_runner_arguments_contract():
    spec = sample_spec()
    args = runner_arguments(spec, store="s3://bucket/p", models_path="/m", input_path="/i", upstream_task_ids=["encode"])
    assert args[0] == "run"
    # the spec travels by content address: a short URI and the hash of its bytes, never the spec itself
    sha = hashlib.sha256(spec.to_bytes()).hexdigest()
    assert option(args, "--spec") == [f"s3://bucket/p/specs/sha256/{sha}.json"]
    assert option(args, "--spec-sha256") == [sha]
    assert GroupSpec.from_json(spec.to_bytes().decode()).to_dict() == spec.to_dict()
    assert max(len(a) for a in args) < 200
    assert option(args, "--store") == ["s3://bucket/p"]
    assert option(args, "--run-key") == [RUN_KEY_TEMPLATE]
    assert option(args, "--try") == [TRY_TEMPLATE]
    assert option(args, "--params") == [PARAMS_TEMPLATE]
    assert option(args, "--inputs") == [inputs_template("encode")]
    assert option(args, "--models") == ["/m"] and option(args, "--input-dir") == ["/i"]
    # defaults to the spec's upstream groups; a root group has no --inputs
    by_default = runner_arguments(spec, store="s3://bucket/p", models_path="/m", input_path="/i")
    assert by_default == args
    assert "--inputs" not in runner_arguments(encode_spec(), store="x", models_path="/m", input_path="/i")


def test_spec_carries_jinja_and_quotes_untouched(tmp_path: Path):
    spec = encode_spec()
    store = open_store(tmp_path / "store")
    args = runner_arguments(spec, store=store.root_uri, models_path="/m", input_path="/i")
    assert not any(TRICKY_PROMPT in a for a in args)  # nothing of the spec is on the command line
    uri = publish_spec(store, spec.to_bytes(), spec.sha256())
    assert option(args, "--spec") == [uri]
    published = read_spec_bytes(store, uri, option(args, "--spec-sha256")[0])
    assert GroupSpec.from_json(published.decode()).nodes["6"]["inputs"]["text"] == TRICKY_PROMPT


# --- the pod ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_manifest() -> dict[str, Any]:
    return render_pod_manifests([pod_task()])[0]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_rendered_pods_validate_against_kubernetes_schema(version: str, gpu_manifest: dict[str, Any]):
    plain = pod_task(GroupTaskConfig(backend="kubernetes"), models_pvc="", service_account_name="")
    for manifest in (gpu_manifest, *render_pod_manifests([plain])):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_pod_spec_carries_the_task_config(gpu_manifest: dict[str, Any]):
    spec = gpu_manifest["spec"]
    base = next(c for c in spec["containers"] if c["name"] == "base")
    assert base["image"] == "registry.example.com/comfy-runner:1.2.3"
    assert base["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"nvidia.com/gpu": "1", "memory": "16Gi"},
    }
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert spec["tolerations"] == list(GPU_TASK.tolerations)
    assert spec["affinity"] == GPU_TASK.affinity
    assert spec["priorityClassName"] == "comfy-vip"
    assert spec["serviceAccountName"] == "comfy-runner"
    assert spec["restartPolicy"] == "Never"
    assert gpu_manifest["metadata"]["namespace"] == "comfy"
    assert {"name": "comfy-models", "persistentVolumeClaim": {"claimName": "comfy-models", "readOnly": True}} in (
        spec["volumes"]
    )
    assert {"name": "comfy-models", "mountPath": "/models", "readOnly": True} in base["volumeMounts"]
    assert option(base["args"], "--models") == ["/models"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in base["env"]
    assert {"name": "COMFY_LOG_LEVEL", "value": "debug"} in base["env"]
    # KPO's xcom sidecar shares /airflow/xcom with the runner
    assert any(c["name"] == "airflow-xcom-sidecar" for c in spec["containers"])
    assert {"name": "xcom", "mountPath": "/airflow/xcom"} in base["volumeMounts"]


def test_pod_runs_the_runner_command(gpu_manifest: dict[str, Any]):
    base = next(c for c in gpu_manifest["spec"]["containers"] if c["name"] == "base")
    assert base["command"] == ["python", "-m", "airflow_comfy.runner"]
    args = base["args"]
    assert args[0] == "run"
    sha = sample_spec().sha256()
    assert option(args, "--spec") == [f"file:///srv/comfy/artifacts/specs/sha256/{sha}.json"]
    assert option(args, "--spec-sha256") == [sha]
    assert option(args, "--xcom-path") == [POD_XCOM_PATH]
    assert option(args, "--inputs") == [inputs_template("encode")]
    assert option(args, "--store") == ["file:///srv/comfy/artifacts"]
    assert "--manifest-out" not in args


def test_pod_templates_render_to_the_runner_arguments():
    """KPO renders the same templates the local run proves (see the Airflow run below); here with a stub context."""

    class StubTI:
        try_number = 2

        def xcom_pull(self, task_ids: str) -> dict[str, str]:
            return {"manifest_uri": f"s3://b/run/{task_ids}/manifest.json"}

    class StubDag:
        dag_id = "wf"

    task = pod_task()
    context = {"dag": StubDag(), "run_id": "manual__1", "ti": StubTI(), "params": {"prompt": TRICKY_PROMPT}}
    task.render_template_fields(context)
    manifest = render_pod_manifests([task])[0]
    kubernetes_validate.validate(manifest, SCHEMA_VERSIONS[-1], strict=True)
    args = manifest["spec"]["containers"][0]["args"]
    assert option(args, "--run-key") == ["wf/manual__1"] and option(args, "--try") == ["2"]
    assert json.loads(option(args, "--params")[0]) == {"prompt": TRICKY_PROMPT}
    assert option(args, "--inputs") == ["s3://b/run/encode/manifest.json"]
    sha = sample_spec().sha256()
    assert option(args, "--spec") == [f"file:///srv/comfy/artifacts/specs/sha256/{sha}.json"]
    assert option(args, "--spec-sha256") == [sha]


def test_pod_labels_and_name_are_valid(gpu_manifest: dict[str, Any]):
    meta = gpu_manifest["metadata"]
    assert meta["labels"]["app.kubernetes.io/name"] == "airflow-comfy"
    assert meta["labels"]["airflow-comfy/workflow"].startswith("txt2img_SDXL.demo")
    assert meta["labels"]["airflow-comfy/group"] == "sample"
    assert meta["name"].startswith("txt2img-sdxl-demo-sample-")
    assert len(meta["name"]) <= 63


@pytest.mark.parametrize(
    ("dag_id", "group"),
    [("txt2img", "sample"), ("Weird DAG id!!_with.dots", "post_process"), ("x" * 300, "g" * 100), ("__", "--")],
)
def test_pod_name_is_a_dns_label_with_room_for_kpo_suffix(dag_id: str, group: str):
    import re

    name = pod_name(dag_id, group)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert len(name) + 9 <= 63


def test_long_and_odd_names_still_validate():
    spec = sample_spec()
    spec.workflow_name = "A very long workflow name / with slashes & spaces " * 3
    spec.group = "sampler_" + "x" * 80
    task = build_group_task(
        spec, task_config=GroupTaskConfig(backend="kubernetes"), settings=settings(), upstream_task_ids=[]
    )
    manifest = render_pod_manifests([task])[0]
    kubernetes_validate.validate(manifest, SCHEMA_VERSIONS[-1], strict=True)


def test_yaml_has_one_document_per_pod():
    import yaml

    manifests = render_pod_manifests([pod_task(), pod_task(GroupTaskConfig(backend="kubernetes"))])
    text = to_yaml(manifests)
    assert text.count("---") == 2
    assert list(yaml.safe_load_all(text)) == manifests


def test_render_works_without_the_named_connection():
    task = pod_task(kubernetes_conn_id="not_defined_anywhere")
    manifest = render_pod_manifests([task])[0]
    kubernetes_validate.validate(manifest, SCHEMA_VERSIONS[-1], strict=True)
    assert task.kubernetes_conn_id == "not_defined_anywhere"


def test_misspelled_kubernetes_fields_are_refused():
    with pytest.raises(ValueError, match="camelCase"):
        pod_task(GroupTaskConfig(backend="kubernetes", tolerations=({"key": "a", "toleration_seconds": 5},)))
    with pytest.raises(ValueError, match="camelCase"):
        pod_task(GroupTaskConfig(backend="kubernetes", affinity={"nodeAfinity": {}}))
    with pytest.raises(ValueError, match="requests"):
        GroupTaskConfig(backend="kubernetes", resources={"limit": {"cpu": "1"}})


def test_task_settings_from_task_config():
    task = pod_task()
    assert task.task_id == "sample"
    assert task.priority_weight == 10
    assert task.retries == 3
    assert task.retry_exponential_backoff == 2.0  # Airflow 3: a multiplier; 1.0 would mean no backoff
    assert task.pool == "default_pool"
    assert task.do_xcom_push and task.get_logs
    assert task.on_finish_action.value == "delete_pod"
    assert '| 3 | KSampler | computed |' in task.doc_md and 'Hands LATENT (node 3 output 0) to `decode`' in task.doc_md
    local = build_group_task(
        sample_spec(),
        task_config=GroupTaskConfig(pool="gpu", pool_slots=2, execution_timeout_seconds=600, retry_delay_seconds=5),
        settings=settings(),
        upstream_task_ids=["encode"],
    )
    assert isinstance(local, ComfyGroupLocalOperator)
    assert (local.pool, local.pool_slots, local.retry_exponential_backoff) == ("gpu", 2, 0)
    assert local.execution_timeout.total_seconds() == 600 and local.retry_delay.total_seconds() == 5


def test_dag_with_group_tasks_serializes():
    """The dag-processor serializes every DAG: both operators must survive the round trip."""
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG("serialize_me", schedule=None) as dag:
        encode = build_group_task(encode_spec(), task_config=GroupTaskConfig(), settings=settings(), upstream_task_ids=[])
        encode >> pod_task()
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    sample = restored.get_task("sample")
    assert sample.task_type == "ComfyGroupPodOperator"
    assert sample.arguments == dag.get_task("sample").arguments
    assert restored.get_task("encode").arguments == encode.arguments
    assert "KSampler" in sample.doc_md


# --- exit code 2 in a pod: not retried ----------------------------------------------------------------------


def finished_pod(exit_code: int, message: str = "bad input: node 3 (KSampler)") -> k8s.V1Pod:
    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, message=message)
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="txt2img-sample-abc", namespace="comfy"),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base")]),
        status=k8s.V1PodStatus(
            phase="Succeeded" if exit_code == 0 else "Failed",
            container_statuses=[
                k8s.V1ContainerStatus(
                    name="base", image="i", image_id="", ready=False, restart_count=0,
                    state=k8s.V1ContainerState(terminated=terminated),
                )
            ],
        ),
    )


def cleanup_with_fake_cluster(exit_code: int, message: str = "bad input: node 3 (KSampler)") -> None:
    """Run KPO's own cleanup of a finished pod; only the API calls (read/patch/delete pod) are faked."""
    task = pod_task()
    pod = finished_pod(exit_code, message)
    task.__dict__["client"] = mock.MagicMock()  # cached_property: patch_namespaced_pod
    task.__dict__["pod_manager"] = mock.MagicMock(read_pod=mock.MagicMock(return_value=pod))
    task.cleanup(pod=pod, remote_pod=pod, context=None)


def test_pod_exit_2_is_not_retried():
    with pytest.raises(AirflowFailException, match="refused its input"):
        cleanup_with_fake_cluster(EXIT_BAD_INPUT)


def test_pod_other_failures_are_retried():
    with pytest.raises(AirflowException) as raised:
        cleanup_with_fake_cluster(1)
    assert not isinstance(raised.value, AirflowFailException)
    cleanup_with_fake_cluster(0)  # success: no exception


@pytest.mark.parametrize(("exit_code", "line"), [
    (1, "airflow-comfy runner: failed: cannot write s3://b/c/runs/d/r/g/try-1/5/0.safetensors: no answer within "
        "45 s (3 attempt(s), connect/read timeouts 5/20 s)"),
    (2, "airflow-comfy runner: bad input: node 3 (KSampler): input 'seed': -1 is below the minimum 0"),
])
def test_pod_failure_message_starts_with_the_runners_sentence(exit_code: int, line: str):
    """The container's termination message (the runner's failure line, after some log lines when the kubelet
    fell back to the log) becomes the first line of the task's error; KPO's pod dump is not repeated."""
    with pytest.raises(AirflowException) as raised:
        cleanup_with_fake_cluster(exit_code, f"INFO node 5 (KSampler): start\n{line}\n")
    assert isinstance(raised.value, AirflowFailException) == (exit_code == EXIT_BAD_INPUT)
    first, second = str(raised.value).splitlines()
    assert first == line.split(": ", 2)[2]
    assert "in pod txt2img-sample-abc" in second and f"exit code {exit_code}" in second
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_container_exit_code():
    assert container_exit_code(finished_pod(2), "base") == 2
    assert container_exit_code(finished_pod(2), "other") is None
    assert container_exit_code(k8s.V1Pod(), "base") is None


# --- the local subprocess, with a fake runner ---------------------------------------------------------------

FAKE_RUNNER = r'''
"""A stand-in for `python -m airflow_comfy.runner`: checks its arguments like the real CLI will, records
them, and behaves as FAKE_EXIT / FAKE_MANIFEST (from its environment) say."""
import argparse, hashlib, json, os, sys

parser = argparse.ArgumentParser()
parser.add_argument("command", choices=["run"])
for flag in ("--spec", "--spec-sha256", "--store", "--run-key", "--try", "--params", "--models", "--input-dir",
             "--manifest-out"):
    parser.add_argument(flag, required=True)
parser.add_argument("--inputs", action="append", default=[])
args = parser.parse_args()
assert args.spec.startswith(args.store + "/specs/sha256/"), (args.spec, args.store)
with open(args.spec[len("file://"):], "rb") as f:  # the operator published it before starting the runner
    data = f.read()
assert hashlib.sha256(data).hexdigest() == args.spec_sha256
spec = json.loads(data)
params = json.loads(args.params)  # must be JSON
assert int(getattr(args, "try")) >= 1
assert os.environ["HF_HUB_OFFLINE"] == "1"
record = os.environ.get("FAKE_RECORD_DIR")
if record:
    with open(os.path.join(record, spec["group"] + ".json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "params": params, "inputs": args.inputs, "run_key": args.run_key,
                   "try": getattr(args, "try"), "env": os.environ.get("COMFY_LOG_LEVEL")}, f)
print(f"fake runner: group {spec['group']} starting", flush=True)
code = int(os.environ.get("FAKE_EXIT", "0"))
if code:
    print("error: node 3 (KSampler), input 'seed': must be an integer", file=sys.stderr)
    if os.environ.get("FAKE_LAST_LINE"):
        print(os.environ["FAKE_LAST_LINE"], file=sys.stderr)
    sys.exit(code)
manifest = os.environ.get("FAKE_MANIFEST")
if manifest is None:
    manifest = json.dumps({"manifest_uri": f"{args.store}/{args.run_key}/{spec['group']}/manifest.json",
                           "group": spec["group"], "outputs": []})
if manifest != "<none>":
    with open(args.manifest_out, "w") as f:
        f.write(manifest)
print("fake runner: done", flush=True)
'''


@pytest.fixture(scope="module")
def fake_runner(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = tmp_path_factory.mktemp("fake_runner") / "fake_runner.py"
    path.write_text(FAKE_RUNNER)
    return [sys.executable, str(path)]


def local_task(fake_runner: list[str], tmp_path: Path, **env: str) -> ComfyGroupLocalOperator:
    """A local task with plain (already rendered) arguments, so execute() needs no Airflow context."""
    task = build_group_task(
        sample_spec(),
        task_config=GroupTaskConfig(env={"COMFY_LOG_LEVEL": "debug", **env}),
        settings=settings(tmp_path),
        upstream_task_ids=[],
        runner_command=fake_runner,
    )
    assert isinstance(task, ComfyGroupLocalOperator)
    rendered = {RUN_KEY_TEMPLATE: "dag/run1", TRY_TEMPLATE: "1", PARAMS_TEMPLATE: '{"seed": 7}'}
    task.arguments = [rendered.get(arg, arg) for arg in task.arguments]
    return task


def test_local_runs_the_runner_command(tmp_path: Path):
    task = build_group_task(
        sample_spec(), task_config=GroupTaskConfig(), settings=settings(tmp_path), upstream_task_ids=["encode"]
    )
    command = task.command("/tmp/m.json")
    assert command[:3] == [sys.executable, "-m", "airflow_comfy.runner"]
    assert command[3:] == [*task.arguments, "--manifest-out", "/tmp/m.json"]
    assert task.arguments == runner_arguments(
        sample_spec(), store=settings(tmp_path).artifact_store, models_path=f"{tmp_path}/models",
        input_path=f"{tmp_path}/input", upstream_task_ids=["encode"],
    )
    assert task.subprocess_env()["HF_HUB_OFFLINE"] == "1"
    other = build_group_task(
        sample_spec(), task_config=GroupTaskConfig(), settings=settings(tmp_path, runner_python="/opt/venv/bin/python"),
        upstream_task_ids=[],
    )
    assert other.command("m")[:3] == ["/opt/venv/bin/python", "-m", "airflow_comfy.runner"]


def test_local_success_returns_the_manifest(fake_runner: list[str], tmp_path: Path):
    record = tmp_path / "record"
    record.mkdir()
    manifest = local_task(fake_runner, tmp_path, FAKE_RECORD_DIR=str(record)).execute(context={})
    assert manifest["manifest_uri"] == f"file://{tmp_path}/artifacts/dag/run1/sample/manifest.json"
    seen = json.loads((record / "sample.json").read_text())
    assert seen["params"] == {"seed": 7} and seen["env"] == "debug"


def test_local_exit_2_is_not_retried(fake_runner: list[str], tmp_path: Path):
    task = local_task(fake_runner, tmp_path, FAKE_EXIT=str(EXIT_BAD_INPUT))
    with pytest.raises(AirflowFailException, match="refused its input") as raised:
        task.execute(context={})
    assert "node 3 (KSampler), input 'seed'" in str(raised.value)  # the runner's last error lines


def test_local_failure_message_is_one_sentence_then_how_it_ended(fake_runner: list[str], tmp_path: Path):
    line = "airflow-comfy runner: failed: node 6 (VAEDecode): RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    task = local_task(fake_runner, tmp_path, FAKE_EXIT="1", FAKE_LAST_LINE=line)
    with pytest.raises(AirflowException) as raised:
        task.execute(context={})
    first, second = str(raised.value).splitlines()
    assert first == "node 6 (VAEDecode): RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    assert second.startswith("The runner failed with exit code 1; retried") and "task log above" in second


def test_runner_gets_its_store_bounds_and_deadline(tmp_path: Path):
    from airflow_comfy.operators.build import runner_deadline

    config = GroupTaskConfig(execution_timeout_seconds=600, env={"COMFY_STORE_TIMEOUTS": "read=9"})
    local = build_group_task(sample_spec(), task_config=config, settings=settings(tmp_path), upstream_task_ids=[])
    assert local.env == {"COMFY_STORE_TIMEOUTS": "read=9", "COMFY_RUNNER_DEADLINE_S": "570"}  # the sidecar's env wins
    assert local.execution_timeout.total_seconds() == 600
    pod = build_group_task(sample_spec(), task_config=GroupTaskConfig(backend="kubernetes"),
                           settings=settings(tmp_path, store_read_timeout=7.0), upstream_task_ids=[])
    env = dict(pod.env_vars)  # a dict until the pod is built
    assert env["COMFY_STORE_TIMEOUTS"] == "connect=5,read=7,operation=45,attempts=4"
    assert "COMFY_RUNNER_DEADLINE_S" not in env  # no execution_timeout here
    assert (runner_deadline(7200), runner_deadline(60), runner_deadline(5)) == (7170, 54, 4.5)


@pytest.mark.parametrize("exit_code", [1, 3, 137])
def test_local_other_failures_are_retried(fake_runner: list[str], tmp_path: Path, exit_code: int):
    task = local_task(fake_runner, tmp_path, FAKE_EXIT=str(exit_code))
    with pytest.raises(AirflowException, match=f"exit code {exit_code}") as raised:
        task.execute(context={})
    assert not isinstance(raised.value, AirflowFailException)
    assert "must be an integer" in str(raised.value)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [("<none>", "wrote no manifest"), ("{not json", "not valid JSON"), ('["a"]', "must be a JSON object")],
)
def test_local_missing_or_bad_manifest(fake_runner: list[str], tmp_path: Path, manifest: str, message: str):
    task = local_task(fake_runner, tmp_path, FAKE_MANIFEST=manifest)
    with pytest.raises(AirflowException, match=message) as raised:
        task.execute(context={})
    assert not isinstance(raised.value, AirflowFailException)


def test_local_runner_that_cannot_start(tmp_path: Path):
    task = local_task([str(tmp_path / "no-such-python")], tmp_path)
    with pytest.raises(AirflowException, match="could not start the runner"):
        task.execute(context={})


# --- a real Airflow run: templates rendered by Airflow, XCom between groups ------------------------------------

DAG_FILE = r'''
"""A two-group workflow DAG (plus two failing groups), run with dag.test(): an airflow DAG file, since
dag.test() in Airflow 3.3 needs the DAG in a bundle."""
import json, pathlib
from airflow.sdk import DAG, Param
from airflow_comfy.config import get_settings
from airflow_comfy.operators import build_group_task, GroupTaskConfig
from airflow_comfy.workflow.groupspec import GroupSpec

home = pathlib.Path(__file__).resolve().parent.parent
payload = json.loads((home / "payload.json").read_text())
settings = get_settings(artifact_store=f"file://{home}/artifacts", models_path=f"{home}/models",
                        input_path=f"{home}/input", runner_python="", backend="local")
params = {"prompt": Param(payload["prompt"], type="string"), "seed": Param(1, type="integer")}
with DAG("comfy_ops_test", schedule=None, params=params) as dag:
    tasks = {}
    for name, spec in payload["groups"].items():
        spec = GroupSpec.from_dict(spec)
        tasks[name] = build_group_task(spec, task_config=GroupTaskConfig(**payload["configs"].get(name, {})),
                                       settings=settings, upstream_task_ids=spec.upstream,
                                       runner_command=payload["runner"], task_id=name)
    tasks["encode"] >> tasks["sample"]

if __name__ == "__main__":
    from airflow.utils import db

    db.upgradedb()  # what `airflow db migrate` does, without paying for a second Airflow import
    run = dag.test(run_conf={"seed": 7})
    states = {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number} for ti in run.get_task_instances()}
    print("RESULT " + json.dumps({"run_id": run.run_id, "state": str(run.state), "tasks": states}))
'''


def airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
    )
    return env


def write_airflow_home(home: Path, fake_runner: list[str]) -> Path:
    """The DAG file and its payload: encode >> sample pass data through XCom; bad_input exits 2 and fails_once
    exits 1, both with retries configured."""
    failing = [
        ("bad_input", {"retries": 2, "retry_delay_seconds": 0}, EXIT_BAD_INPUT),
        ("fails_once", {"retries": 1, "retry_delay_seconds": 0}, 1),
    ]
    groups = {"encode": encode_spec().to_dict(), "sample": sample_spec().to_dict()}
    configs: dict[str, Any] = {}
    for name, config, code in failing:
        spec = encode_spec()
        spec.group = name
        groups[name] = spec.to_dict()
        configs[name] = {**config, "env": {"FAKE_EXIT": str(code)}}
    payload = {"prompt": TRICKY_PROMPT, "groups": groups, "configs": configs, "runner": fake_runner}
    (home / "payload.json").write_text(json.dumps(payload))
    (home / "dags").mkdir()
    dag_file = home / "dags" / "comfy_ops_test.py"
    dag_file.write_text(DAG_FILE)
    return dag_file


@pytest.fixture(scope="module")
def airflow_process(tmp_path_factory: pytest.TempPathFactory, fake_runner: list[str]):
    """One dag.test() run on SQLite in a temporary AIRFLOW_HOME, in a background subprocess."""
    home = tmp_path_factory.mktemp("airflow_home")
    (home / "record").mkdir()
    dag_file = write_airflow_home(home, fake_runner)
    env = {**airflow_env(home), "FAKE_RECORD_DIR": str(home / "record")}
    with open(home / "output.log", "w") as output:
        proc = subprocess.Popen(
            [sys.executable, str(dag_file)], env=env, stdout=output, stderr=subprocess.STDOUT, cwd=home
        )
    yield proc, home
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_airflow_run_early(request: pytest.FixtureRequest) -> None:
    """Start the slow Airflow run before this module's fast tests (when a selected test needs it), so the
    two overlap."""
    if any("airflow_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("airflow_process")


@pytest.fixture(scope="module")
def airflow_run(airflow_process: tuple[subprocess.Popen, Path]) -> dict[str, Any]:
    proc, home = airflow_process
    result = dag_test_result(proc, home, timeout=300)
    result["seen"] = {p.stem: json.loads(p.read_text()) for p in (home / "record").glob("*.json")}
    result["home"] = str(home)
    return result


@pytest.mark.airflow
def test_airflow_run_renders_the_runner_arguments(airflow_run: dict[str, Any]):
    tasks = airflow_run["tasks"]
    assert tasks["encode"]["state"] == "success" and tasks["sample"]["state"] == "success"
    encode, sample = airflow_run["seen"]["encode"], airflow_run["seen"]["sample"]
    run_key = f"comfy_ops_test/{airflow_run['run_id']}"
    assert encode["run_key"] == run_key and sample["run_key"] == run_key
    assert encode["try"] == "1"
    # params given at run time reach --params as JSON, merged with the DAG's defaults, Jinja-looking text untouched
    assert encode["params"] == {"prompt": TRICKY_PROMPT, "seed": 7}
    # the spec's prompt reaches the runner unchanged after Airflow rendered the templates
    # (the operator wrote the spec to the store at its content address; the log names the URI, no blob)
    uri = option(encode["argv"], "--spec")[0]
    data = read_spec_bytes(open_store(f"file://{airflow_run['home']}/artifacts"), uri,
                           option(encode["argv"], "--spec-sha256")[0])
    spec = GroupSpec.from_json(data.decode())
    assert spec.nodes["6"]["inputs"]["text"] == TRICKY_PROMPT
    assert spec.to_dict() == encode_spec().to_dict()
    assert any(f"Group spec: {uri} (sha256 " in line for line in airflow_run["output"].splitlines())
    # the upstream group's manifest URI reaches --inputs through XCom
    store = f"file://{airflow_run['home']}/artifacts"
    assert encode["inputs"] == []
    assert sample["inputs"] == [f"{store}/{run_key}/encode/manifest.json"]
    templated = [arg for flag in ("--run-key", "--try", "--inputs") for arg in option(sample["argv"], flag)]
    assert templated and not any("{" in arg for arg in templated)
    # the runner's output went to the task log, line by line
    log_lines = [line for line in airflow_run["output"].splitlines() if "ComfyGroupLocalOperator" in line]
    assert any("fake runner: group sample starting" in line for line in log_lines)
    assert any("fake runner: done" in line for line in log_lines)


@pytest.mark.airflow
def test_airflow_run_does_not_retry_bad_input(airflow_run: dict[str, Any]):
    tasks = airflow_run["tasks"]
    assert tasks["bad_input"] == {"state": "failed", "try_number": 1}
    assert tasks["fails_once"]["state"] == "failed" and tasks["fails_once"]["try_number"] == 2
    assert airflow_run["state"] == "failed"


def test_failure_text_takes_the_runners_last_failure_line():
    from airflow_comfy.operators.failure_text import runner_failure, runner_sentence

    lines = ["Traceback (most recent call last):", "airflow-comfy runner: failed: an earlier one", "noise",
             "2026-11-27 INFO airflow-comfy runner: bad input: node 1 (LoadImage): input 'image': 'x.png' not found"]
    assert runner_sentence(lines) == "node 1 (LoadImage): input 'image': 'x.png' not found"
    assert runner_sentence(["no such line"]) is None
    killed = runner_failure(-9, ["INFO node 5 (KSampler): start"]).splitlines()
    assert killed == ["the runner was killed by SIGKILL before it could say why (out of memory?)",
                      "The runner was killed (SIGKILL, exit code -9); retried if the task has retries left. Its "
                      "output, and any traceback, are in the task log above."]
    assert runner_failure(-15, []).startswith("the runner was killed by SIGTERM before it could say why\n")
    assert "(128 + 9: killed by SIGKILL" in runner_failure(137, ["last words"])
    assert runner_failure(1, []).startswith("the runner ended without a word\n")


def test_store_and_timeout_settings(monkeypatch: pytest.MonkeyPatch):
    assert get_settings().execution_timeout == 7200
    assert get_settings().store_limits.to_text() == "connect=5,read=20,operation=45,attempts=4"
    monkeypatch.setenv("AIRFLOW__COMFY__STORE_OPERATION_TIMEOUT", "12")
    monkeypatch.setenv("AIRFLOW__COMFY__EXECUTION_TIMEOUT", "")
    current = get_settings()
    assert current.store_limits.operation_timeout == 12 and current.execution_timeout is None
    monkeypatch.setenv("AIRFLOW__COMFY__STORE_ATTEMPTS", "0")
    with pytest.raises(ValueError, match=r"\[comfy\] store_\* settings: store attempts must be at least 1"):
        get_settings()
