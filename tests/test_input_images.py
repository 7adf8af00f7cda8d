"""Input images given by URI: an ``s3://`` object of the input store (moto's S3 server over HTTP), a ``file://`` URI
inside the input folder, or a plain file name; every other value is refused with a sentence that names it.

The img2img example runs sliced (four groups) through the real runner: the image read from S3, or through a
``file://`` URI, gives the pixels the plain name gives, and the sha256 of its bytes is in the manifests and the
run snapshot. Refused values end the group with exit code 2 (bad input: not retried) and the sentence.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from s3_server import moto_s3_server

from airflow_comfy.artifacts.store import read_uri
from airflow_comfy.local_run import GroupFailed, LocalRunResult, compile_for_run, run_workflow
from airflow_comfy.workflow.inputs import InputRoots, input_image_problem

ROOT = Path(__file__).resolve().parents[1]
IMG2IMG = ROOT / "example_workflows" / "img2img.json"
LOAD_GROUP = "load_and_encode_the_image"
FAST = {"steps": 2}


# --- the rules, as a person triggering a run reads them ------------------------------------------------------------

ROOTS = InputRoots(folder="/data/input", store="s3://bucket/inputs")


@pytest.mark.parametrize("value, sentence", [
    ("../secret.png", "'../secret.png' leaves the input folder"),
    ("shots/../../secret.png", "'shots/../../secret.png' leaves the input folder"),
    ("/etc/x.png", "'/etc/x.png' is an absolute path"),
    ("x.gif", "'x.gif' is not an image type the runner reads (png, jpg, jpeg, webp)"),
    ("s3://other/x.png", "'s3://other/x.png' is not in the input store (s3://bucket/inputs/)"),
    ("s3://bucket/inputs-old/x.png", "is not in the input store (s3://bucket/inputs/)"),
    ("s3://bucket/inputs/../x.png", "leaves the input store (s3://bucket/inputs/)"),
    ("file:///data/secret.png", "'file:///data/secret.png' is not in the input folder (file:///data/input/)"),
    ("file:///data/input/../secret.png", "leaves the input folder"),
    ("file:///data/input/%2e%2e/secret.png", "leaves the input folder"),
    ("file://server/data/input/x.png", "names another host"),
    ("https://example.com/x.png", "is not an input image the runner can read"),
    ("x.png [output]", "only input images can be loaded"),
])
def test_refusals_are_sentences(value: str, sentence: str):
    problem = input_image_problem(value, ROOTS)
    assert problem is not None and sentence in problem
    assert "^" not in problem and "(?" not in problem  # never a regular expression


@pytest.mark.parametrize("value", ["cat.png", "shots/cat.JPG", "cat.webp [input]", "s3://bucket/inputs/cat.jpeg",
                                   "s3://bucket/inputs/a/b.png", "file:///data/input/cat.png",
                                   "file://localhost/data/input/shots/cat.png"])
def test_accepted_forms(value: str):
    assert input_image_problem(value, ROOTS) is None


def test_without_an_input_store_s3_uris_are_refused():
    problem = input_image_problem("s3://bucket/inputs/cat.png", InputRoots(folder="/data/input"))
    assert problem and "no input store is configured ([comfy] input_store)" in problem


# --- through the runner --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """moto's S3 server, fake credentials in the environment (runner subprocesses inherit them), a new bucket."""
    import boto3

    home = tmp_path_factory.mktemp("aws")
    with moto_s3_server() as endpoint, pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEINPUTS000042")
        env.setenv("AWS_SECRET_ACCESS_KEY", "fake-inputs-secret")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(home / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        client = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"inputs-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        yield client, bucket


def run_img2img(image: str, *, input_dir: Path, store: str, models: Path, input_store: str = "",
                run_id: str, in_process: bool = True, groups: list[str] | None = None) -> LocalRunResult:
    compiled = compile_for_run(IMG2IMG)
    if groups is not None:
        compiled.groups = [g for g in compiled.groups if g["task_id"] in groups]
    extra = ["--threads", "1", *(["--input-store", input_store] if input_store else [])]
    return run_workflow(compiled, models=models, input_dir=input_dir, store=store, params={**FAST, "image": image},
                        run_id=run_id, extra_args=extra, in_process=in_process, echo=lambda _line: None)


def pixels(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(read_uri(uri))) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def by_name(demo_models: Path, demo_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalRunResult:
    """The control: the image given as a plain name in the input folder."""
    return run_img2img("demo-input.png", input_dir=demo_inputs, models=demo_models, run_id="by-name",
                       store=tmp_path_factory.mktemp("store-by-name").as_uri())


def test_an_s3_input_runs_end_to_end(s3_bucket, by_name: LocalRunResult, demo_models: Path, demo_inputs: Path,
                                     tmp_path: Path):
    client, bucket = s3_bucket
    data = (demo_inputs / "demo-input.png").read_bytes()
    client.put_object(Bucket=bucket, Key="inputs/uploads/demo-input.png", Body=data)
    uri = f"s3://{bucket}/inputs/uploads/demo-input.png"
    empty = tmp_path / "no-inputs"  # the image can only come from the store
    empty.mkdir()
    result = run_img2img(uri, input_dir=empty, models=demo_models, input_store=f"s3://{bucket}/inputs",
                         store=f"s3://{bucket}/comfy", run_id="from-s3")
    [image] = result.images
    [control] = by_name.images
    assert image["uri"].startswith(f"s3://{bucket}/comfy/runs/img2img/from-s3/outputs/")
    assert np.array_equal(pixels(image["uri"]), pixels(control["uri"]))
    digest = hashlib.sha256(data).hexdigest()
    assert result.manifests[LOAD_GROUP]["inputs"] == {uri: digest}
    # the decode group read no image itself: its manifest and snapshot carry its upstream groups' inputs
    assert result.manifests["decode_and_save"]["inputs"] == {uri: digest}
    snapshot_uri = image["uri"].rsplit("/", 1)[0] + "/snapshot.decode_and_save.json"
    snapshot = json.loads(read_uri(snapshot_uri))
    assert snapshot["inputs"] == {uri: digest} and snapshot["params"]["image"] == uri


def test_a_file_uri_inside_the_input_folder_runs(by_name: LocalRunResult, demo_models: Path, demo_inputs: Path,
                                                 tmp_path: Path):
    uri = (demo_inputs / "demo-input.png").as_uri()
    result = run_img2img(uri, input_dir=demo_inputs, models=demo_models, run_id="from-file-uri",
                         store=(tmp_path / "store").as_uri())
    assert np.array_equal(pixels(result.images[0]["uri"]), pixels(by_name.images[0]["uri"]))
    digest = hashlib.sha256((demo_inputs / "demo-input.png").read_bytes()).hexdigest()
    assert result.manifests["decode_and_save"]["inputs"] == {uri: digest}


def test_refused_inputs_fail_the_group_with_the_sentence(s3_bucket, demo_models: Path, demo_inputs: Path,
                                                         tmp_path: Path):
    """Each value reaches the runner (as a trigger's param would where the api-server has no plugin) and is
    refused before any node runs: exit code 2, the sentence on the last line, no traceback."""
    client, bucket = s3_bucket
    outside = tmp_path / "outside.png"
    outside.write_bytes((demo_inputs / "demo-input.png").read_bytes())
    client.put_object(Bucket=bucket, Key="elsewhere/x.png", Body=outside.read_bytes())
    cases = [
        (outside.as_uri(), f"'{outside.as_uri()}' is not in the input folder (file://{demo_inputs}/)"),
        (f"s3://{bucket}/elsewhere/x.png",
         f"'s3://{bucket}/elsewhere/x.png' is not in the input store (s3://{bucket}/inputs/)"),
        (f"s3://{bucket}/inputs/missing.png", f"input image 's3://{bucket}/inputs/missing.png' not found in the "
                                              "input store"),
        ("demo-input.gif", "'demo-input.gif' is not an image type the runner reads (png, jpg, jpeg, webp)"),
    ]
    for index, (value, sentence) in enumerate(cases):
        with pytest.raises(GroupFailed) as failed:
            run_img2img(value, input_dir=demo_inputs, models=demo_models, input_store=f"s3://{bucket}/inputs",
                        store=(tmp_path / "store").as_uri(), run_id=f"refused-{index}", in_process=False,
                        groups=[LOAD_GROUP])
        assert failed.value.returncode == 2, failed.value.output[-3000:]
        last = failed.value.output.strip().splitlines()[-1]
        assert "node 10 (LoadImage): input 'image'" in last and sentence in last, last
        assert "Traceback" not in failed.value.output
