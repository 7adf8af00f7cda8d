"""The runner against S3: moto's S3 server over HTTP, fake credentials in the environment, and the txt2img example
run sliced through real runner subprocesses (the environment, endpoint included, reaches them as it reaches a pod).
"""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from s3_server import moto_s3_server

from airflow_comfy import local_run
from airflow_comfy.artifacts.store import file_uri_path
from airflow_comfy.factory.compile import CompiledWorkflow
from airflow_comfy.local_run import GroupFailed, LocalRunResult, compile_for_run, run_workflow

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "example_workflows" / "txt2img.json"
THREADS = ["--threads", "1"]
FAKE_KEY_ID = "AKIAFAKERUNNER000042"
FAKE_SECRET = "fake-runner-secret-Hh7Gg6Ff5"
FAKE_TOKEN = "fake-runner-token-Kk3Jj2"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free port, and an environment (inherited by subprocesses) that points at it with
    fake credentials and no real AWS configuration."""
    home = tmp_path_factory.mktemp("aws")
    with moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
        env.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        env.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(home / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        yield endpoint


@dataclass
class S3Run:
    bucket: str
    client: Any
    compiled: CompiledWorkflow
    result: LocalRunResult
    local: LocalRunResult
    logs: list[str] = field(default_factory=list)
    """stdout and stderr of every runner subprocess."""

    @property
    def run_prefix(self) -> str:
        return f"comfy/runs/{self.result.run_key}/"

    def object_keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="comfy/")
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def key_of(self, uri: str) -> str:
        prefix = f"s3://{self.bucket}/"
        assert uri.startswith(prefix), uri
        return uri[len(prefix):]


def _recording_subprocess(logs: list[str]) -> SimpleNamespace:
    def run(*args, **kwargs):
        completed = subprocess.run(*args, **kwargs)
        logs.append(f"$ {' '.join(map(str, args[0]))}\n{completed.stdout}\n{completed.stderr}")
        return completed

    return SimpleNamespace(run=run)


@pytest.fixture(scope="module")
def s3_run(s3_endpoint: str, demo_models: Path, demo_inputs: Path,
           tmp_path_factory: pytest.TempPathFactory) -> S3Run:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"comfy-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    compiled = compile_for_run(WORKFLOW)
    assert [group["task_id"] for group in compiled.groups] == ["inference", "postprocess"]
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_run, "subprocess", _recording_subprocess(logs))
        result = run_workflow(compiled, models=demo_models, input_dir=demo_inputs, store=f"s3://{bucket}/comfy",
                              run_id="s3-run", extra_args=THREADS, in_process=False, echo=lambda _line: None)
    assert len(logs) == 2
    local = run_workflow(compiled, models=demo_models, input_dir=demo_inputs,
                         store=tmp_path_factory.mktemp("local-store").as_uri(), run_id="local-run",
                         extra_args=THREADS, in_process=True, echo=lambda _line: None)
    return S3Run(bucket=bucket, client=client, compiled=compiled, result=result, local=local, logs=logs)


def test_images_are_in_the_bucket_with_png_metadata(s3_run: S3Run):
    images = s3_run.result.images
    assert [(image["node"], image["filename"]) for image in images] == [("7", "txt2img_00001_.png")]
    key = s3_run.key_of(images[0]["uri"])
    assert key == s3_run.run_prefix + "outputs/txt2img_00001_.png"
    head = s3_run.client.head_object(Bucket=s3_run.bucket, Key=key)
    assert head["ContentType"] == "image/png"
    with Image.open(io.BytesIO(s3_run.get(key))) as image:
        image.load()
        assert image.size == (64, 64)
        assert set(image.text) == {"prompt", "workflow"}
        assert json.loads(image.text["prompt"])["5"]["class_type"] == "KSampler"
        assert json.loads(image.text["workflow"])["nodes"]
    snapshot = json.loads(s3_run.get(s3_run.run_prefix + "outputs/snapshot.postprocess.json"))
    assert snapshot["images"] == [images[0]["uri"]]
    assert set(snapshot["models"]) == {"checkpoints/demo-sd15-tiny.safetensors"}


def test_boundary_artifacts_and_manifests_are_under_runs(s3_run: S3Run):
    keys = s3_run.object_keys()
    prefix = s3_run.run_prefix
    assert prefix == "comfy/runs/txt2img/s3-run/"
    specs = [key for key in keys if key.startswith("comfy/specs/sha256/")]  # one per group, by content
    assert sorted(specs) == sorted(f"comfy/specs/sha256/{g['spec_sha256']}.json" for g in s3_run.compiled.groups)
    assert [key for key in keys if key not in specs] == sorted([
        prefix + "inference/try-1/5/0.safetensors",
        prefix + "inference/try-1/manifest.json",
        prefix + "postprocess/try-1/manifest.json",
        prefix + "outputs/txt2img_00001_.png",
        prefix + "outputs/snapshot.postprocess.json",
    ])
    inference, postprocess = s3_run.result.manifests["inference"], s3_run.result.manifests["postprocess"]
    assert inference["manifest_uri"] == f"s3://{s3_run.bucket}/{prefix}inference/try-1/manifest.json"
    assert json.loads(s3_run.get(s3_run.key_of(inference["manifest_uri"]))) == inference
    assert json.loads(s3_run.get(s3_run.key_of(postprocess["manifest_uri"]))) == postprocess
    [latent] = inference["outputs"]
    assert (latent["node"], latent["output"], latent["type"]) == ("5", 0, "LATENT")
    assert latent["uri"] == f"s3://{s3_run.bucket}/{prefix}inference/try-1/5/0.safetensors"
    assert len(s3_run.get(s3_run.key_of(latent["uri"]))) == latent["bytes"]
    # The postprocess subprocess found the latent through the inference manifest's URI.
    assert any(f"--inputs {inference['manifest_uri']}" in log for log in s3_run.logs)


def test_pixels_equal_a_local_store_run(s3_run: S3Run):
    [remote] = s3_run.result.images
    [local] = s3_run.local.images
    with Image.open(io.BytesIO(s3_run.get(s3_run.key_of(remote["uri"])))) as image:
        remote_pixels = np.asarray(image.convert("RGB"))
    with Image.open(file_uri_path(local["uri"])) as image:
        local_pixels = np.asarray(image.convert("RGB"))
    assert np.array_equal(remote_pixels, local_pixels)
    assert remote["sha256"] != "" and remote["width"] == local["width"] == 64
    # Same latent bytes crossed both stores.
    assert (s3_run.result.manifests["inference"]["outputs"][0]["sha256"]
            == s3_run.local.manifests["inference"]["outputs"][0]["sha256"])


def _assert_no_secret(text: str, what: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{what} contains a credential"


def test_credentials_never_appear_in_manifests_objects_or_logs(s3_run: S3Run):
    for key in s3_run.object_keys():
        _assert_no_secret(s3_run.get(key).decode("latin-1"), key)
    for manifest in s3_run.result.manifests.values():
        _assert_no_secret(json.dumps(manifest), "manifest")
    assert s3_run.logs and all("manifest: s3://" in log for log in s3_run.logs)
    for log in s3_run.logs:
        _assert_no_secret(log, "runner log")


def test_missing_bucket_is_refused_and_its_log_has_no_credentials(s3_endpoint: str, demo_models: Path,
                                                                 demo_inputs: Path):
    """No bucket: no retry makes one, so the task is not retried (exit code 2)."""
    compiled = compile_for_run(WORKFLOW)
    compiled.groups = compiled.groups[:1]  # the inference group: its spec cannot be written to the store
    with pytest.raises(GroupFailed) as failed:
        run_workflow(compiled, models=demo_models, input_dir=demo_inputs,
                     store=f"s3://missing-{uuid.uuid4().hex[:12]}/comfy", run_id="no-bucket", extra_args=THREADS,
                     in_process=False, echo=lambda _line: None)
    assert failed.value.returncode == 2
    message = str(failed.value)
    assert "NoSuchBucket" in message
    _assert_no_secret(message, "the failed runner's output")
