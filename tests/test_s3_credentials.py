"""S3 credentials of the artifact store from an Airflow connection (local backend) or a Kubernetes Secret (pods):
they reach the runner's environment only, never its arguments, the operator, rendered templates, logs or XCom."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from s3_server import moto_s3_server
from test_operators import SCHEMA_VERSIONS, pod_task, sample_spec, settings

from airflow_comfy.config import get_settings
from airflow_comfy.operators import build_group_task
from airflow_comfy.operators.local import ComfyGroupLocalOperator
from airflow_comfy.operators.render import render_pod_manifests
from airflow_comfy.operators.task_config import GroupTaskConfig
from airflow_comfy.provider_info import provider_info

CONN_ID = "comfy_s3_test"
KEY_ID = "AKIACONNECTION000042"
SECRET = "conn-secret-Zq9Xw8Vu7Ts6"
TOKEN = "conn-token-Pp4Oo3Nn2Mm1"
REGION = "eu-central-1"
SECRETS = (KEY_ID, SECRET, TOKEN)

#: Records the runner's AWS variables (names and sha256 of the values only) and writes a manifest.
ENV_RUNNER = r'''
import argparse, hashlib, json, os, sys

parser = argparse.ArgumentParser()
parser.add_argument("command")
parser.add_argument("--store")
parser.add_argument("--manifest-out")
args, _ = parser.parse_known_args()
seen = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in os.environ.items() if k.startswith("AWS_")}
with open(os.environ["ENV_RECORD"], "w") as f:
    json.dump(seen, f)
print("env runner: AWS variables", sorted(seen), flush=True)
with open(args.manifest_out, "w") as f:
    json.dump({"manifest_uri": args.store + "/manifest.json", "aws_names": sorted(seen)}, f)
'''

#: Lists the buckets of AWS_ENDPOINT_URL_S3 with boto3, using nothing but its environment.
BOTO3_RUNNER = r'''
import argparse, json, sys
import boto3

parser = argparse.ArgumentParser()
parser.add_argument("command")
parser.add_argument("--manifest-out")
args, _ = parser.parse_known_args()
try:
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
except Exception as exc:
    print(f"boto3 failed: {type(exc).__name__}", file=sys.stderr)
    sys.exit(1)
with open(args.manifest_out, "w") as f:
    json.dump({"manifest_uri": "s3://listed/manifest.json", "buckets": names}, f)
'''


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


def define_connection(monkeypatch: pytest.MonkeyPatch, endpoint: str, *, token: bool = True) -> None:
    extra: dict[str, str] = {"endpoint_url": endpoint, "region_name": REGION}
    if token:
        extra["aws_session_token"] = TOKEN
    conn = {"conn_type": "aws", "login": KEY_ID, "password": SECRET, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A worker whose own AWS identity is a different one (it must not leak into or mix with the connection's)
    and with no AWS configuration files."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWORKERWORKER0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "worker-token")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def s3_task(tmp_path: Path, runner: list[str], *, aws_conn_id: str = CONN_ID, **env: str) -> ComfyGroupLocalOperator:
    task = build_group_task(
        sample_spec(),
        task_config=GroupTaskConfig(env=env),
        settings=settings(tmp_path, artifact_store="s3://comfy-bucket/prefix", aws_conn_id=aws_conn_id),
        upstream_task_ids=["encode"],
        runner_command=runner,
    )
    assert isinstance(task, ComfyGroupLocalOperator)
    return task


class StubTI:
    try_number = 1

    def xcom_pull(self, task_ids: str) -> dict[str, str]:
        return {"manifest_uri": f"s3://comfy-bucket/prefix/runs/{task_ids}/manifest.json"}


class StubDag:
    dag_id = "wf"


def render(task: ComfyGroupLocalOperator) -> None:
    task.render_template_fields({"dag": StubDag(), "run_id": "manual__1", "ti": StubTI(), "params": {"seed": 7}})


def assert_no_secret(what: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{what} contains a secret"


# --- settings ---------------------------------------------------------------------------------------------------


def test_settings_default_empty_and_documented(monkeypatch: pytest.MonkeyPatch):
    assert get_settings().aws_conn_id == "" and get_settings().aws_secret_name == ""
    monkeypatch.setenv("AIRFLOW__COMFY__AWS_CONN_ID", "my_s3")
    monkeypatch.setenv("AIRFLOW__COMFY__AWS_SECRET_NAME", "comfy-s3")
    current = get_settings()
    assert (current.aws_conn_id, current.aws_secret_name) == ("my_s3", "comfy-s3")
    options = provider_info()["config"]["comfy"]["options"]
    assert options["aws_conn_id"]["default"] == "" and options["aws_secret_name"]["default"] == ""


# --- local backend ----------------------------------------------------------------------------------------------


def test_connection_credentials_reach_only_the_runner_environment(
    clean_aws_env: None, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
):
    define_connection(monkeypatch, moto_endpoint)
    record = tmp_path / "env.json"
    task = s3_task(tmp_path, script(tmp_path, "env_runner.py", ENV_RUNNER), ENV_RECORD=str(record))
    render(task)
    assert "wf/manual__1" in task.arguments  # the templates were rendered
    assert task.aws_conn_id == CONN_ID
    with caplog.at_level(logging.DEBUG):
        manifest = task.execute(context={})

    seen = json.loads(record.read_text())
    assert seen["AWS_ACCESS_KEY_ID"] == sha(KEY_ID)
    assert seen["AWS_SECRET_ACCESS_KEY"] == sha(SECRET)
    assert seen["AWS_SESSION_TOKEN"] == sha(TOKEN)
    assert seen["AWS_DEFAULT_REGION"] == sha(REGION)
    assert seen["AWS_ENDPOINT_URL_S3"] == sha(moto_endpoint)
    assert "worker" not in json.dumps(seen)  # hashes only, and none of the worker's identity
    assert sha("worker-secret") not in seen.values()

    # nowhere else: the operator (arguments, env, every attribute), rendered templates, XCom, logs
    assert_no_secret("the rendered arguments", json.dumps(task.arguments))
    assert_no_secret("the rendered env", json.dumps(task.env))
    assert_no_secret("the operator", repr(vars(task)))
    assert_no_secret("the command", json.dumps(task.command("/tmp/m.json")))
    assert_no_secret("the XCom", json.dumps(manifest))
    assert_no_secret("the log", caplog.text)
    out, err = capfd.readouterr()
    assert_no_secret("the output", out + err)
    assert manifest["manifest_uri"] == "s3://comfy-bucket/prefix/manifest.json"
    assert "--store" in task.arguments and "s3://comfy-bucket/prefix" in task.arguments
    # the worker wrote the group spec to the store with the connection's credentials, before the runner started
    spec_uri = task.arguments[task.arguments.index("--spec") + 1]
    assert bucket_object(moto_endpoint, spec_uri) == sample_spec().to_bytes()


def test_task_env_still_wins_and_no_conn_keeps_worker_environment(
    clean_aws_env: None, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    define_connection(monkeypatch, moto_endpoint, token=False)
    record = tmp_path / "env.json"
    runner = script(tmp_path, "env_runner.py", ENV_RUNNER)
    task = s3_task(tmp_path, runner, ENV_RECORD=str(record), AWS_DEFAULT_REGION="us-west-2")
    render(task)
    task.execute(context={})
    seen = json.loads(record.read_text())
    assert seen["AWS_DEFAULT_REGION"] == sha("us-west-2")  # the sidecar's env is explicit
    assert seen["AWS_ACCESS_KEY_ID"] == sha(KEY_ID)
    assert "AWS_SESSION_TOKEN" not in seen  # the worker's token is not mixed with the connection's keys

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)  # the worker's own S3 configuration
    plain = s3_task(tmp_path, runner, aws_conn_id="", ENV_RECORD=str(record))
    assert plain.aws_conn_id is None
    render(plain)
    plain.execute(context={})
    seen = json.loads(record.read_text())
    assert seen["AWS_ACCESS_KEY_ID"] == sha("AKIAWORKERWORKER0001")
    assert seen["AWS_SESSION_TOKEN"] == sha("worker-token")


def test_connection_is_read_at_execute_time_not_parse_time(clean_aws_env: None, tmp_path: Path):
    runner = script(tmp_path, "env_runner.py", ENV_RUNNER)
    task = s3_task(tmp_path, runner, aws_conn_id="not_defined_anywhere", ENV_RECORD=str(tmp_path / "e.json"))
    render(task)
    with pytest.raises(AirflowException, match="not_defined_anywhere") as raised:
        task.execute(context={})
    assert not isinstance(raised.value, AirflowFailException)  # retried: the connection may appear
    assert not (tmp_path / "e.json").exists()


def test_dag_with_aws_conn_id_serializes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    define_connection(monkeypatch, "http://127.0.0.1:9")
    with DAG("wf_s3", schedule=None) as dag:
        for backend in ("local", "kubernetes"):
            build_group_task(
                sample_spec(), task_config=GroupTaskConfig(backend=backend), task_id=f"sample_{backend}",
                settings=settings(tmp_path, artifact_store="s3://bucket-b/p", aws_conn_id=CONN_ID,
                                  aws_secret_name="comfy-s3"),
                upstream_task_ids=[],
            )
    serialized = DagSerialization.to_dict(dag)
    text = json.dumps(serialized, default=str)
    assert_no_secret("the serialized DAG", text)
    assert "comfy-s3" in text  # the pod's envFrom (a template field); the conn id lives in the DAG file only
    restored = DagSerialization.from_dict(serialized)
    assert set(restored.task_dict) == {"sample_local", "sample_kubernetes"}


# --- end to end: boto3 in the runner subprocess against moto's S3 server -----------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server with the bucket of ``s3_task``'s store."""
    with moto_s3_server() as endpoint:
        setup_client(endpoint).create_bucket(Bucket="comfy-bucket")
        yield endpoint


def setup_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                        aws_secret_access_key="setup")


def bucket_object(endpoint: str, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return setup_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


def test_boto3_in_the_runner_lists_the_bucket_with_only_the_connection(
    clean_aws_env: None, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):

    setup_client(moto_endpoint).create_bucket(Bucket="comfy-e2e-bucket")
    # the worker has no AWS identity at all: boto3 in the runner can only use what the connection gives it
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    runner = script(tmp_path, "boto3_runner.py", BOTO3_RUNNER)

    without = s3_task(tmp_path, runner, aws_conn_id="")
    render(without)
    with pytest.raises(AirflowException, match="NoCredentialsError"):
        without.execute(context={})

    define_connection(monkeypatch, moto_endpoint)
    task = s3_task(tmp_path, runner)
    render(task)
    manifest = task.execute(context={})
    assert "comfy-e2e-bucket" in manifest["buckets"]
    assert_no_secret("the XCom", json.dumps(manifest))
    assert_no_secret("the operator", repr(vars(task)))


# --- pods -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_pod_gets_the_secret_as_env_from(version: str):
    manifest = render_pod_manifests([pod_task(aws_secret_name="comfy-s3-credentials")])[0]
    kubernetes_validate.validate(manifest, version, strict=True)
    base = next(c for c in manifest["spec"]["containers"] if c["name"] == "base")
    assert base["envFrom"] == [{"secretRef": {"name": "comfy-s3-credentials"}}]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in base["env"]
    # the xcom sidecar does not get the credentials
    sidecar = next(c for c in manifest["spec"]["containers"] if c["name"] == "airflow-xcom-sidecar")
    assert not sidecar.get("envFrom")


def test_pod_without_secret_has_no_env_from():
    manifest = render_pod_manifests([pod_task(GroupTaskConfig(backend="kubernetes"))])[0]
    kubernetes_validate.validate(manifest, SCHEMA_VERSIONS[-1], strict=True)
    assert not any(c.get("envFrom") for c in manifest["spec"]["containers"])


def test_pod_ignores_aws_conn_id(monkeypatch: pytest.MonkeyPatch):
    """Pods never read the connection (its secrets would end up in the pod spec): credentials come from the
    Secret, IRSA or the image."""
    define_connection(monkeypatch, "http://127.0.0.1:9000")
    manifest: dict[str, Any] = render_pod_manifests([pod_task(aws_conn_id=CONN_ID)])[0]
    assert_no_secret("the pod", json.dumps(manifest))
