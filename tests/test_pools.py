"""GPU pools: the pools file, which pool each group lands in, what its pod asks Kubernetes for, the restricted
pod every group runs in, ``airflow-comfy pools sync`` against a real Airflow database, and ``render-pods``
printing YAML and nothing else."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from workflow_builders import EXAMPLES, txt2img, write

from airflow_comfy.config import get_settings
from airflow_comfy.factory.compile import compile_workflow
from airflow_comfy.factory.loader import build_dag, scan_workflows
from airflow_comfy.factory.sidecar import load_sidecar, parse_sidecar, sidecar_path
from airflow_comfy.operators.pod import POD_USER_ID, SCRATCH_PATH, ComfyGroupPodOperator
from airflow_comfy.operators.render import render_pod_manifests, to_yaml
from airflow_comfy.scheduling.pools import (
    PoolsConfig,
    assign_pool,
    group_role,
    load_pools,
    merge_resources,
    parse_pools,
    sync_pools,
)
from airflow_comfy.workflow.catalog import load_catalog
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.loader import read_workflow_file

SCHEMA_VERSIONS = ("1.30.0", "1.37.0")
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.json"))
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
POOLS_YAML = textwrap.dedent("""\
    pools:
      gpu_big:
        slots: 4
        gpus: 2
        memory: 48Gi
        cpu: "8"
        node_selector: {gpu-class: a100}
        tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
        runtime_class: nvidia
        image: registry.example.com/comfy-runner:0.1.0-cuda
        role: sampling
        description: A100 nodes
      gpu_small:
        slots: 2
        gpu_resource: amd.com/gpu
        gpus: 1
        memory: 12Gi
        cpu: 2
        role: light
      cpu_only:
        slots: -1
    """)
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True, "runAsUser": POD_USER_ID, "runAsGroup": POD_USER_ID, "privileged": False,
    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.fixture(scope="module")
def pools_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("pools") / "pools.yaml", POOLS_YAML)


def k8s_settings(**overrides: Any):
    values = {"backend": "kubernetes", "cache_dir": "", "namespace": "comfy", "models_pvc": "comfy-models"}
    values.update(overrides)
    return get_settings(**values)


def compile_example(path: Path, sidecar_text: str | None = None):
    sidecar = parse_sidecar(sidecar_text, str(path) + ".comfy.yaml") if sidecar_text is not None else (
        load_sidecar(sidecar_path(path)))
    return compile_workflow(path, read_workflow_file(path), sidecar, load_catalog([]), max_nodes=2_000), sidecar


def tasks_of(path: Path, pools: PoolsConfig | None, sidecar_text: str | None = None, **setting_overrides: Any):
    compiled, sidecar = compile_example(path, sidecar_text)
    dag = build_dag(compiled, sidecar, k8s_settings(**setting_overrides), pools=pools or PoolsConfig())
    return {task.task_id: task for task in dag.tasks}


@functools.cache
def roles(path: Path) -> dict[str, str]:
    compiled, _ = compile_example(path)
    return {g["task_id"]: group_role(g["spec"]["nodes"]) for g in compiled.groups}


def base(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in manifest["spec"]["containers"] if c["name"] == "base")


# --- the pools file ------------------------------------------------------------------------------------------


def test_pools_file_is_read_with_defaults(pools_file: Path):
    pools = load_pools(pools_file)
    assert list(pools.pools) == ["gpu_big", "gpu_small", "cpu_only"]
    big, small, cpu = pools.pools.values()
    assert (big.slots, big.gpus, big.gpu_resource, big.runtime_class, big.role) == (
        4, 2, "nvidia.com/gpu", "nvidia", "sampling")
    assert big.resources() == {"requests": {"cpu": "8", "memory": "48Gi"},
                               "limits": {"memory": "48Gi", "nvidia.com/gpu": "2"}}
    assert small.cpu == "2" and small.resources()["limits"] == {"memory": "12Gi", "amd.com/gpu": "1"}
    assert (cpu.slots, cpu.gpus, cpu.role, cpu.resources()) == (-1, 0, None, {})
    assert pools.for_role("sampling") is big and pools.for_role("light") is small
    assert len(pools.digest) == 64
    assert load_pools("") == PoolsConfig() and load_pools(None).pools == {}


@pytest.mark.parametrize("text, fragment", [
    ("pool:\n  a: {slots: 1}", "unknown top-level key(s) 'pool'; allowed: pools"),
    ("pools: {}", "'pools' must map pool names"),
    ("[1, 2]", "must be a YAML mapping"),
    ("pools: {a: {slots: [unclosed", "invalid YAML"),
    ("pools: {gpu: 4}", "pool 'gpu': must be a mapping"),
    ("pools: {gpu: {slots: 1, gpu: 1}}", "pool 'gpu': unknown key(s) 'gpu'; allowed: slots, gpus"),
    ("pools: {gpu: {gpus: 1}}", "pool 'gpu': 'slots' is required"),
    ("pools: {gpu: {slots: '4'}}", "pool 'gpu': slots must be an integer >= 0 (or -1: unlimited), not '4'"),
    ("pools: {gpu: {slots: true}}", "pool 'gpu': slots must be an integer"),
    ("pools: {gpu: {slots: -2}}", "pool 'gpu': slots must be an integer"),
    ("pools: {gpu: {slots: 1, gpus: 1.5}}", "pool 'gpu': gpus must be an integer >= 0, not 1.5"),
    ("pools: {gpu: {slots: 1, gpu_resource: gpu}}", "pool 'gpu': gpu_resource must be an extended resource"),
    ("pools: {gpu: {slots: 1, memory: lots}}", "pool 'gpu': memory must be a positive Kubernetes quantity"),
    ("pools: {gpu: {slots: 1, cpu: 0}}", "pool 'gpu': cpu must be a positive Kubernetes quantity"),
    ("pools: {gpu: {slots: 1, cpu: [1]}}", "pool 'gpu': cpu must be a Kubernetes quantity"),
    ("pools: {gpu: {slots: 1, node_selector: [a]}}", "pool 'gpu': node_selector must map label keys"),
    ("pools: {gpu: {slots: 1, node_selector: {big: true}}}", 'node_selector.big must be a string (quote it: "true")'),
    ("pools: {gpu: {slots: 1, node_selector: {'bad key!': x}}}", "node_selector key 'bad key!' is not"),
    ("pools: {gpu: {slots: 1, tolerations: {key: x}}}", "pool 'gpu': tolerations must be a list"),
    ("pools: {gpu: {slots: 1, tolerations: [{key: x, toleration_seconds: 5}]}}",
     "pool 'gpu': tolerations[0]: unknown key(s) 'toleration_seconds'"),
    ("pools: {gpu: {slots: 1, tolerations: [{key: x, operator: Maybe}]}}", "tolerations[0].operator must be one of"),
    ("pools: {gpu: {slots: 1, tolerations: [{key: x, effect: Never}]}}", "tolerations[0].effect must be one of"),
    ("pools: {gpu: {slots: 1, tolerations: [{key: x, operator: Exists, value: y}]}}", "Exists takes no value"),
    ("pools: {gpu: {slots: 1, tolerations: [{key: x, tolerationSeconds: soon}]}}", "tolerationSeconds must be"),
    ("pools: {gpu: {slots: 1, runtime_class: NVIDIA}}", "pool 'gpu': runtime_class must be a RuntimeClass name"),
    ("pools: {gpu: {slots: 1, image: ''}}", "pool 'gpu': image must be a non-empty string"),
    ("pools: {gpu: {slots: 1, role: heavy}}", "pool 'gpu': role must be one of sampling, light, not 'heavy'"),
    ("pools: {a: {slots: 1, role: light}, b: {slots: 1, role: light}}", "pools 'a', 'b' all have role 'light'"),
    ("pools: {'bad name!': {slots: 1}}", "pool name 'bad name!' must be"),
])
def test_pools_file_errors_name_the_file_and_the_pool(tmp_path: Path, text: str, fragment: str):
    path = write(tmp_path / "pools.yaml", text)
    with pytest.raises(WorkflowError) as info:
        load_pools(path)
    message = str(info.value)
    assert message.startswith(f"{path}: pools file: ") and fragment in message, message


def test_missing_pools_file_is_an_error(tmp_path: Path):
    with pytest.raises(WorkflowError, match=f"{tmp_path}/nope.yaml: pools file: cannot read the file"):
        load_pools(tmp_path / "nope.yaml")


# --- which pool a group goes to ------------------------------------------------------------------------------


def test_groups_that_sample_are_sampling_groups():
    assert roles(EXAMPLES / "img2img.json") == {"prompts": "light", "load_and_encode_the_image": "light",
                                                "sample": "sampling", "decode_and_save": "light"}
    for path in EXAMPLE_FILES:
        assert sorted(set(roles(path).values())) in (["light", "sampling"], ["sampling"]), path
    assert group_role({"1": {"class_type": "KSamplerAdvanced"}}) == "sampling"
    assert group_role({"1": {"class_type": "SamplerCustom"}}) == "sampling"
    assert group_role({"1": {"class_type": "ImageUpscaleWithModel"}, "2": {"class_type": "SaveImage"}}) == "light"


def test_groups_go_to_the_pool_of_their_role(pools_file: Path):
    pools = load_pools(pools_file)
    tasks = tasks_of(EXAMPLES / "img2img.json", pools)
    assert {t: task.pool for t, task in tasks.items()} == {
        "prompts": "gpu_small", "load_and_encode_the_image": "gpu_small", "sample": "gpu_big",
        "decode_and_save": "gpu_small"}
    assert {task.pool_slots for task in tasks.values()} == {1}
    # without a light pool the other groups stay in default_pool; without a sampling pool, so do samplers
    no_light = parse_pools("pools: {gpu_big: {slots: 2, gpus: 1, role: sampling}}", "p.yaml")
    assert {t: task.pool for t, task in tasks_of(EXAMPLES / "txt2img.json", no_light).items()} == {
        "inference": "gpu_big", "postprocess": "default_pool"}
    no_roles = parse_pools("pools: {gpu_big: {slots: 2, gpus: 1}}", "p.yaml")
    assert {task.pool for task in tasks_of(EXAMPLES / "txt2img.json", no_roles).values()} == {"default_pool"}
    assert {task.pool for task in tasks_of(EXAMPLES / "txt2img.json", None, default_pool="comfy").values()} == {
        "comfy"}
    assert assign_pool({}, explicit=None, pools=PoolsConfig(), default_pool="x").pool == "x"


def test_pods_ask_for_what_their_pool_declares(pools_file: Path):
    tasks = tasks_of(EXAMPLES / "img2img.json", load_pools(pools_file))
    sample = render_pod_manifests([tasks["sample"]])[0]
    container, spec = base(sample), sample["spec"]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "48Gi"},
                                      "limits": {"memory": "48Gi", "nvidia.com/gpu": "2"}}
    assert container["image"] == "registry.example.com/comfy-runner:0.1.0-cuda"
    assert spec["nodeSelector"] == {"gpu-class": "a100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["runtimeClassName"] == "nvidia"
    decode = render_pod_manifests([tasks["decode_and_save"]])[0]
    assert base(decode)["resources"] == {"requests": {"cpu": "2", "memory": "12Gi"},
                                         "limits": {"memory": "12Gi", "amd.com/gpu": "1"}}
    assert base(decode)["image"] == get_settings().runner_image
    assert "runtimeClassName" not in decode["spec"] and decode["spec"]["nodeSelector"] == {}


def test_without_pools_sampling_pods_still_get_one_gpu():
    tasks = tasks_of(EXAMPLES / "img2img.json", None)
    assert tasks["sample"].container_resources.limits == {"nvidia.com/gpu": "1"}
    assert tasks["sample"].container_resources.requests is None
    assert all(tasks[t].container_resources is None for t in ("prompts", "load_and_encode_the_image",
                                                              "decode_and_save"))
    # the sidecar's own GPU (any vendor, any amount) replaces it; other resources keep it
    amd = tasks_of(EXAMPLES / "txt2img.json", None, "tasks: {inference: {resources: {limits: {amd.com/gpu: 1}}}}")
    assert amd["inference"].container_resources.limits == {"amd.com/gpu": "1"}
    none = tasks_of(EXAMPLES / "txt2img.json", None, "resources: {limits: {nvidia.com/gpu: 0}}")
    assert none["inference"].container_resources.limits == {"nvidia.com/gpu": "0"}
    cpu = tasks_of(EXAMPLES / "txt2img.json", None, "resources: {requests: {cpu: 3}}")
    assert cpu["inference"].container_resources.to_dict() == {
        "claims": None, "requests": {"cpu": "3"}, "limits": {"nvidia.com/gpu": "1"}}
    assert cpu["postprocess"].container_resources.to_dict()["limits"] is None
    # a declared pool is the authority: a GPU-less pool gives a sampling group no GPU
    cpu_pool = parse_pools("pools: {cpu: {slots: 1, cpu: 4, role: sampling}}", "p.yaml")
    assert tasks_of(EXAMPLES / "txt2img.json", cpu_pool)["inference"].container_resources.limits is None
    # the local backend asks nobody for a GPU
    local = tasks_of(EXAMPLES / "txt2img.json", None, backend="local")
    assert not isinstance(local["inference"], ComfyGroupPodOperator)


def test_the_sidecar_overrides_the_pool(pools_file: Path):
    pools = load_pools(pools_file)
    sidecar = textwrap.dedent("""\
        pool: cpu_only
        tasks:
          inference:
            pool: gpu_small
            image: registry.example.com/mine:1
            resources: {requests: {memory: 20Gi}, limits: {amd.com/gpu: 2}}
            node_selector: {zone: b}
            tolerations: [{key: spot, operator: Exists}]
            pool_slots: 2
        """)
    tasks = tasks_of(EXAMPLES / "txt2img.json", pools, sidecar)
    assert (tasks["postprocess"].pool, tasks["inference"].pool, tasks["inference"].pool_slots) == (
        "cpu_only", "gpu_small", 2)
    inference = render_pod_manifests([tasks["inference"]])[0]
    # a resource the sidecar names comes from the sidecar alone (no 12Gi limit under a 20Gi request)
    assert base(inference)["resources"] == {"requests": {"cpu": "2", "memory": "20Gi"},
                                            "limits": {"amd.com/gpu": "2"}}
    assert base(inference)["image"] == "registry.example.com/mine:1"
    assert inference["spec"]["nodeSelector"] == {"zone": "b"}
    assert inference["spec"]["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert merge_resources({"limits": {"memory": "1Gi", "x.io/gpu": "1"}}, {"requests": {"memory": "2Gi"}}) == {
        "requests": {"memory": "2Gi"}, "limits": {"x.io/gpu": "1"}}
    # the pool's node selector and tolerations stay under the sidecar's
    big = tasks_of(EXAMPLES / "txt2img.json", pools, "node_selector: {zone: b}\ntolerations: [{key: spot, "
                                                     "operator: Exists}]")
    pod = render_pod_manifests([big["inference"]])[0]["spec"]
    assert pod["nodeSelector"] == {"gpu-class": "a100", "zone": "b"}
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "spot"]


def test_a_pool_not_in_the_pools_file_is_an_error(pools_file: Path, tmp_path: Path):
    pools = load_pools(pools_file)
    with pytest.raises(WorkflowError) as info:
        tasks_of(EXAMPLES / "txt2img.json", pools, "tasks: {inference: {pool: gpu_bgi}}")
    message = str(info.value)
    assert "txt2img.json.comfy.yaml: sidecar: tasks.inference: pool 'gpu_bgi' is not declared in the pools " \
           f"file {pools_file} (declared: cpu_only, gpu_big, gpu_small" in message
    assert tasks_of(EXAMPLES / "txt2img.json", pools, "pool: default_pool")["inference"].pool == "default_pool"
    # without a pools file any Airflow pool goes
    assert tasks_of(EXAMPLES / "txt2img.json", None, "pool: made_by_hand")["inference"].pool == "made_by_hand"


def test_a_bad_pools_file_is_the_import_error_and_changes_the_cache_context(tmp_path: Path):
    folder = tmp_path / "wfs"
    folder.mkdir()
    write(folder / "good.json", txt2img())
    pools = write(tmp_path / "pools.yaml", "pools: {gpu: {slots: 1, gpus: one}}")
    scan = scan_workflows(folder, get_settings(pools_file=str(pools), cache_dir=str(tmp_path / "cache")))
    assert not scan.dags and [e.file for e in scan.errors] == [str(pools)]
    assert "pool 'gpu': gpus must be an integer" in scan.import_error_text()
    write(pools, "pools: {gpu: {slots: 1, gpus: 1, role: sampling}}")
    scan = scan_workflows(folder, get_settings(pools_file=str(pools), cache_dir=str(tmp_path / "cache")))
    assert not scan.errors and scan.dags["good"].get_task("inference").pool == "gpu"


# --- every pod of every example ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_pods(pools_file: Path) -> list[tuple[str, str, bool, dict[str, Any]]]:
    """(example, group, with pools file, manifest) for every group pod of every example, rendered with an S3
    store whose credentials come from an Airflow connection and a Kubernetes Secret."""
    pods = []
    env = {"AIRFLOW_CONN_COMFY_S3": json.dumps({"conn_type": "aws", "login": "AKIAEXAMPLE", "password": SECRET})}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for pools in (None, load_pools(pools_file)):
            for path in EXAMPLE_FILES:
                tasks = tasks_of(path, pools, artifact_store="s3://bucket/comfy", aws_conn_id="comfy_s3",
                                 aws_secret_name="comfy-s3-credentials")
                for task_id, manifest in zip(tasks, render_pod_manifests(list(tasks.values())), strict=True):
                    pods.append((path.name, task_id, pools is not None, manifest))
    return pods


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_example_pod_validates_strictly(example_pods, version: str):
    assert len(example_pods) == 2 * sum(len(roles(p)) for p in EXAMPLE_FILES)
    for example, group, with_pools, manifest in example_pods:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the message names the pod
            raise AssertionError(f"{example} {group} (pools file: {with_pools}): {exc}") from exc


def test_sampling_pods_request_their_pools_gpu(example_pods):
    for example, group, with_pools, manifest in example_pods:
        limits = base(manifest).get("resources", {}).get("limits", {})
        if roles(EXAMPLES / example)[group] == "sampling":
            # txt2img_grouped's sidecar asks for its own GPU, which wins over the pool's
            expected = "2" if with_pools and example != "txt2img_grouped.json" else "1"
            assert limits.get("nvidia.com/gpu") == expected, (example, group)
            assert manifest["spec"].get("runtimeClassName") == ("nvidia" if with_pools else None)
        else:
            assert limits.get("amd.com/gpu") == ("1" if with_pools else None), (example, group)
            assert "nvidia.com/gpu" not in limits


def test_every_container_runs_restricted(example_pods):
    for example, group, _, manifest in example_pods:
        spec = manifest["spec"]
        assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": POD_USER_ID, "runAsGroup": POD_USER_ID,
                                           "fsGroup": POD_USER_ID, "seccompProfile": {"type": "RuntimeDefault"}}
        assert [c["name"] for c in spec["containers"]] == ["base", "airflow-xcom-sidecar"]
        assert not spec.get("initContainers")
        for container in spec["containers"]:
            assert container["securityContext"] == RESTRICTED_CONTAINER, (example, group, container["name"])
        container = base(manifest)
        # the only writable places: the scratch emptyDir at /tmp (every home and cache points there) and xcom
        assert {"name": "comfy-scratch", "mountPath": SCRATCH_PATH} in container["volumeMounts"]
        assert {"name": "comfy-scratch", "emptyDir": {}} in spec["volumes"]
        env = {e["name"]: e["value"] for e in container["env"]}
        for name in ("HOME", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "TMPDIR"):
            assert env[name] == SCRATCH_PATH or env[name].startswith(SCRATCH_PATH + "/"), name
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert writable == {SCRATCH_PATH, "/airflow/xcom"}
        assert not any(v.get("hostPath") for v in spec["volumes"])
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")


def test_no_secret_in_any_pod(example_pods):
    for example, group, _, manifest in example_pods:
        text = json.dumps(manifest)
        assert SECRET not in text and "AKIAEXAMPLE" not in text, (example, group)
        container = base(manifest)
        assert container["envFrom"] == [{"secretRef": {"name": "comfy-s3-credentials"}}]
        assert not any(e["name"].startswith("AWS_") for e in container["env"])


# --- airflow-comfy pools sync, against a real Airflow metadata database ------------------------------------


def comfy_cli(*args: Any, env: dict[str, str], returncode: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "airflow_comfy.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == returncode, f"exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.airflow
def test_pools_sync_is_idempotent_against_a_real_database(tmp_path: Path, airflow_env, run_airflow):
    pools = write(tmp_path / "pools.yaml", POOLS_YAML)
    env = airflow_env(tmp_path / "home", pools_file=str(pools))
    run_airflow("db", "migrate", env=env)
    run_airflow("pools", "set", "gpu_small", "7", "made by hand", env=env)

    def airflow_pools() -> dict[str, dict[str, Any]]:
        rows = json.loads(run_airflow("pools", "list", "-o", "json", env=env).stdout)
        return {row["pool"]: row for row in rows}

    dry = comfy_cli("pools", "sync", "--dry-run", env=env)
    assert dry.stdout.splitlines() == ["would create gpu_big (4 slots)",
                                       "would update gpu_small: 7 -> 2 slots, description",
                                       "would create cpu_only (unlimited slots)"]
    assert set(airflow_pools()) == {"default_pool", "gpu_small"}

    first = comfy_cli("pools", "sync", env=env)
    assert first.stdout.splitlines() == ["created gpu_big (4 slots)", "updated gpu_small: 7 -> 2 slots, description",
                                         "created cpu_only (unlimited slots)"]
    stored = airflow_pools()
    assert {name: int(row["slots"]) for name, row in stored.items()} == {
        "default_pool": 128, "gpu_big": 4, "gpu_small": 2, "cpu_only": -1}
    assert stored["gpu_big"]["description"] == "A100 nodes"
    assert stored["gpu_small"]["description"] == ("airflow-comfy: 1 x amd.com/gpu, cpu 2, memory 12Gi, "
                                                  "default for light groups")

    second = comfy_cli("pools", "sync", env=env)
    assert second.stdout.splitlines() == ["unchanged gpu_big (4 slots)", "unchanged gpu_small (2 slots)",
                                          "unchanged cpu_only (unlimited slots)"]

    write(pools, POOLS_YAML.replace("slots: 2", "slots: 3"))
    third = comfy_cli("pools", "sync", "--pools-file", pools, env={**env, "AIRFLOW__COMFY__POOLS_FILE": ""})
    assert third.stdout.splitlines() == ["unchanged gpu_big (4 slots)", "updated gpu_small: 2 -> 3 slots",
                                         "unchanged cpu_only (unlimited slots)"]
    assert airflow_pools() == {**stored, "gpu_small": {**stored["gpu_small"], "slots": "3"}}


def test_pools_sync_needs_a_good_pools_file(tmp_path: Path, capsys):
    from airflow_comfy.cli import main

    assert main(["pools", "sync"]) == 2
    out, err = capsys.readouterr()
    assert not out and "error: no pools file: set [comfy] pools_file or pass --pools-file" in err
    bad = write(tmp_path / "bad.yaml", "pools: {gpu: {slots: many}}")
    assert main(["pools", "sync", "--pools-file", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert not out and f"error: {bad}: pools file: pool 'gpu': slots must be" in err


def test_sync_keeps_what_it_does_not_manage():
    class FakeClient:
        def __init__(self):
            self.rows = {"gpu": ("gpu", 1, "old", True, "team-a")}
            self.calls = []

        def get_pools(self):
            return list(self.rows.values())

        def create_pool(self, **kwargs):
            self.calls.append(kwargs)

    client = FakeClient()
    pools = parse_pools("pools: {gpu: {slots: 2, description: old}}", "p.yaml")
    assert sync_pools(pools, client=client) == ["updated gpu: 1 -> 2 slots"]
    assert client.calls == [{"name": "gpu", "slots": 2, "description": "old", "include_deferred": True,
                             "team_name": "team-a"}]
    assert sync_pools(pools, client=client, dry_run=True) == ["would update gpu: 1 -> 2 slots"]
    assert len(client.calls) == 1


# --- render-pods: YAML on stdout, nothing else ---------------------------------------------------------------


@pytest.mark.airflow
def test_render_pods_prints_only_yaml(tmp_path: Path, airflow_env, pools_file: Path):
    # an undefined Kubernetes connection makes the renderer log a warning per pod, KPO logs a line per pod
    env = airflow_env(tmp_path / "home", kubernetes_conn_id="not_defined", cache_dir="", pools_file=str(pools_file))
    result = comfy_cli("render-pods", EXAMPLES / "img2img.json", env=env)
    assert "Building pod" in result.stderr and "not defined here" in result.stderr
    pods = list(yaml.safe_load_all(result.stdout))
    assert result.stdout.startswith("---\napiVersion: v1\nkind: Pod\n")
    assert result.stdout == to_yaml(pods)  # nothing but the documents
    assert [p["metadata"]["labels"]["airflow-comfy/group"] for p in pods] == [
        "prompts", "load_and_encode_the_image", "sample", "decode_and_save"]
    assert [p["spec"]["containers"][0]["resources"]["limits"] for p in pods] == [
        {"memory": "12Gi", "amd.com/gpu": "1"}] * 2 + [{"memory": "48Gi", "nvidia.com/gpu": "2"}] + [
        {"memory": "12Gi", "amd.com/gpu": "1"}]

    forced = comfy_cli("render-pods", EXAMPLES / "txt2img_grouped.json", "--pool", "gpu_big", env=env)
    pods = list(yaml.safe_load_all(forced.stdout))
    assert forced.stdout == to_yaml(pods)
    assert {p["spec"].get("runtimeClassName") for p in pods} == {"nvidia"}
    for pod in pods:
        kubernetes_validate.validate(pod, SCHEMA_VERSIONS[-1], strict=True)
    # the sidecar's own resources still win under --pool (its prompts group asks for 2Gi)
    assert pods[0]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}

    other_file = write(tmp_path / "other.yaml", "pools: {tiny: {slots: 1, cpu: 500m}}")
    tiny = comfy_cli("render-pods", EXAMPLES / "txt2img.json", "--pools-file", other_file, "--pool", "tiny",
                     env=env)
    assert [p["spec"]["containers"][0]["resources"] for p in yaml.safe_load_all(tiny.stdout)] == [
        {"requests": {"cpu": "500m"}}] * 2


def test_render_pods_in_process_keeps_stdout_for_yaml(capsys, pools_file: Path, tmp_path: Path):
    from airflow_comfy.cli import main

    assert main(["render-pods", str(EXAMPLES / "txt2img.json"), "--pools-file", str(pools_file)]) == 0
    out, _ = capsys.readouterr()
    assert out == to_yaml(list(yaml.safe_load_all(out))) and out.count("kind: Pod") == 2
    assert os.write(1, b"") == 0  # file descriptor 1 is back
    args = ["render-pods", str(EXAMPLES / "txt2img.json"), "--pools-file", str(pools_file), "--pool", "gpu_bgi"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and "error: --pool: pool 'gpu_bgi' is not declared in the pools file" in err
    invalid = write(tmp_path / "bad.json", txt2img(**{"3.steps": 0}))
    assert main(["render-pods", str(invalid)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "node 3 (KSampler): input 'steps'" in err


TIERS = ("vip", "high", "normal", "batch")


@pytest.mark.parametrize("tier", TIERS)
def test_render_pods_for_every_example_and_tier(capsys, pools_file: Path, tier: str):
    """``render-pods --tier``: every pod of every example, as a run of that tier would create it: strictly
    valid, the tier's priority class, its pool's GPU for sampling groups, restricted containers."""
    from airflow_comfy.cli import main

    for path in EXAMPLE_FILES:
        for pools in ([], ["--pools-file", str(pools_file)]):
            assert main(["render-pods", str(path), "--tier", tier, *pools]) == 0, path
            out, _ = capsys.readouterr()
            pods = list(yaml.safe_load_all(out))
            assert out == to_yaml(pods) and len(pods) == len(roles(path)), path
            for pod, role in zip(pods, roles(path).values(), strict=True):
                for version in SCHEMA_VERSIONS:
                    kubernetes_validate.validate(pod, version, strict=True)
                spec = pod["spec"]
                assert spec["priorityClassName"] == f"airflow-comfy-{tier}", (path, pod["metadata"])
                assert spec["securityContext"]["runAsNonRoot"] is True
                for container in spec["containers"]:
                    assert container["securityContext"]["allowPrivilegeEscalation"] is False
                    assert container["securityContext"]["readOnlyRootFilesystem"] is True
                limits = spec["containers"][0].get("resources", {}).get("limits", {})
                if role == "sampling":
                    assert any(key.endswith("/gpu") for key in limits), (path, limits)
    assert main(["render-pods", str(EXAMPLE_FILES[0]), "--tier", "urgent"]) == 2
    assert "--tier: 'urgent' is not a tier" in capsys.readouterr().err
