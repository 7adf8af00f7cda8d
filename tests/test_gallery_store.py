"""Uploads into the input store, through a real api-server, scheduler and dag-processor, set up as the compose
stack is: the artifact store and the input store both in one S3 bucket (moto's S3 server over HTTP), the store
credentials only in the Airflow connection ``[comfy] aws_conn_id`` names (no ``AWS_*`` in any process's
environment), and an input folder that holds no image and is read-only to the test's deployment story: the upload
can only reach the runner through the store.

* the upload page says the images go to the input store, and an upload answers the ``s3://`` URI to paste;
* the object is in the store with the uploaded bytes (the same bytes again: the same URI);
* that URI, given as ``image`` to a REST trigger, is accepted; the run succeeds and the sha256 the run's
  snapshot records for that input is the uploaded file's (the snapshot read back through the gallery's route,
  so from S3 with the api-server's store credentials).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from airflow_deployment import AirflowDeployment
from PIL import Image
from postgres import migrated_airflow_database
from s3_server import moto_s3_server
from workflow_builders import EXAMPLES, REPO

pytestmark = pytest.mark.airflow

DAG_ID = "upload_img2img"
CONN_ID = "comfy_store"
PASSWORD = "admin-secret"
REGION = "us-east-1"


class Stack:
    """The deployment, the S3 client the test checks the bucket with, and an HTTP client with the admin's token."""

    def __init__(self, deployment: AirflowDeployment, client: Any, bucket: str) -> None:
        self.deployment, self.client, self.bucket = deployment, client, bucket
        self.input_store = f"s3://{bucket}/inputs"
        self._token: str | None = None

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, bytes]:
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        conn = http.client.HTTPConnection("127.0.0.1", self.deployment.api_port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def token(self) -> str:
        if self._token is None:
            status, body = self.request("POST", "/auth/token", auth=False, headers={
                "Content-Type": "application/json"}, body=json.dumps({"username": "admin", "password": PASSWORD}).encode())
            assert status == 201, body
            self._token = json.loads(body)["access_token"]
        return self._token

    def upload(self, filename: str, data: bytes) -> tuple[int, dict]:
        boundary = "comfy-store-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"dag_id\"\r\n\r\n{DAG_ID}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, answer = self.request("POST", "/comfy/upload", body=body,
                                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(answer)

    def trigger(self, run_id: str, conf: dict) -> tuple[int, dict]:
        body = json.dumps({"dag_run_id": run_id, "logical_date": None, "conf": conf}).encode()
        status, answer = self.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", body=body,
                                      headers={"Content-Type": "application/json"})
        return status, json.loads(answer)

    def wait_for_run(self, run_id: str, timeout: float = 600) -> str:
        def finished() -> str | None:
            rows = self.deployment.sql(f"SELECT state FROM dag_run WHERE dag_id = '{DAG_ID}' AND run_id = '{run_id}'")
            return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

        return self.deployment.wait_for(f"run {run_id}", finished, timeout, interval=2.0)

    def json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)


@pytest.fixture(scope="module")
def stack(postgres_server, demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import boto3

    home = tmp_path_factory.mktemp("upload-store-airflow")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "comfy_workflows.py", dags)
    shutil.copy(EXAMPLES / "img2img.json", dags / f"{DAG_ID}.json")
    (home / "input").mkdir()  # empty: an image can only come from the input store
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    with moto_s3_server() as endpoint:
        key_id, secret = "AKIACOMFYSTORE000001", uuid.uuid4().hex
        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=key_id,
                              aws_secret_access_key=secret)
        bucket = f"comfy-{uuid.uuid4().hex[:10]}"
        client.create_bucket(Bucket=bucket)
        connection = {"conn_type": "aws", "login": key_id, "password": secret,
                      "extra": {"endpoint_url": endpoint, "region_name": REGION}}
        database = migrated_airflow_database(postgres_server, "upload_store",
                                             {**os.environ, "AIRFLOW_HOME": str(home)},
                                             airflow_bin=str(Path(sys.executable).with_name("airflow")))
        deployment = AirflowDeployment(home, database, dags, env={
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(connection),
            "AIRFLOW__COMFY__AWS_CONN_ID": CONN_ID,
            "AIRFLOW__COMFY__ARTIFACT_STORE": f"s3://{bucket}/artifacts",
            "AIRFLOW__COMFY__INPUT_STORE": f"s3://{bucket}/inputs",
            "AIRFLOW__COMFY__MODELS_PATH": str(demo_models),
            "AIRFLOW__COMFY__INPUT_PATH": str(home / "input"),
            "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
            "AIRFLOW__COMFY__RUNNER_PYTHON": sys.executable,
            "AIRFLOW__COMFY__RUNNER_SERVICE_DIR": os.environ["AIRFLOW__COMFY__RUNNER_SERVICE_DIR"],  # conftest's
            "COMFY_RUNNER_THREADS": "1",
        })
        for name in [name for name in deployment.env if name.startswith("AWS_")]:  # only the connection has them
            del deployment.env[name]
        deployment.env.update({"AWS_CONFIG_FILE": str(home / "no-aws-config"), "AWS_EC2_METADATA_DISABLED": "true",
                               "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials")})
        with deployment:
            deployment.wait_for_api()
            deployment.wait_for_dags({DAG_ID})
            yield Stack(deployment, client, bucket)


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def test_the_upload_page_says_uploads_go_to_the_input_store(stack: Stack):
    status, page = stack.request("GET", "/comfy/upload")
    text = page.decode()
    assert status == 200 and 'id="comfy-upload-target" data-where="input_store"' in text
    assert f"input store {stack.input_store}/" in text and "s3:// URI" in text


def test_an_uploaded_image_runs_from_the_input_store(stack: Stack):
    blue = _png((20, 40, 230))
    status, answer = stack.upload("../my blue.png", blue)
    assert status == 201, answer
    assert answer["where"] == "input_store" and answer["value"] == answer["uri"]
    uri = answer["uri"]
    assert uri == f"{stack.input_store}/{answer['name']}" and answer["name"].startswith("upload-")
    stored = stack.client.get_object(Bucket=stack.bucket, Key=f"inputs/{answer['name']}")["Body"].read()
    assert stored == blue
    assert stack.upload("again.png", blue)[1]["uri"] == uri.replace("my_blue", "again")  # same hash, new name
    assert stack.upload("../my blue.png", blue) == (201, answer)  # the same upload again: the same answer
    assert not list((stack.deployment.home / "input").iterdir())  # nothing went to the input folder

    status, created = stack.trigger("from_upload", {"image": uri, "steps": 2})
    assert status == 200, created
    assert stack.wait_for_run("from_upload") == "success", stack.deployment.logs_tail()
    [run] = stack.json(f"/comfy/api/runs?dag_id={DAG_ID}&run_id=from_upload")["runs"]
    assert run["params"]["image"] == uri and len(run["images"]) == 1
    snapshot_path = next(task["snapshot"] for task in run["tasks"] if task["task_id"] == run["images"][0]["task_id"])
    snapshot = stack.json(f"/comfy/runs/{DAG_ID}/from_upload/files/{quote(snapshot_path)}")
    assert snapshot["inputs"] == {uri: hashlib.sha256(blue).hexdigest()}


def test_an_upload_uri_outside_the_input_store_is_refused_at_trigger(stack: Stack):
    status, answer = stack.trigger("elsewhere", {"image": f"s3://{stack.bucket}/artifacts/x.png"})
    assert status == 400
    assert f"is not in the input store ({stack.input_store}/)" in answer["detail"], answer
