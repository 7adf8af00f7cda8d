"""Trigger params through real Airflow.

* The REST API (what the trigger form posts to), on a real api-server + dag-processor + scheduler on PostgreSQL
  (tests/airflow_deployment.py): a bad input image is refused when the run is triggered, with a sentence
  ("'../secret.png' leaves the input folder"), never a regular expression; URIs inside the input store and
  input folder are accepted; the sidecar's ``auto_params: [sampler, scheduler]`` offers both as choices. The
  DAG is paused (runs are created and stay queued): only the trigger is under test here.
* ``airflow dags test``: a run triggered with ``{"sampler": ..., "scheduler": ...}`` samples with them (the
  run snapshot and the PNG's prompt metadata say so), through the loader stub, the local operator and the runner.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow_deployment import AirflowDeployment
from PIL import Image
from postgres import migrated_airflow_database
from workflow_builders import EXAMPLES, REPO

pytestmark = pytest.mark.airflow

SIDECAR = "auto_params: [sampler, scheduler]\n"
INPUT_STORE = "s3://comfy-inputs/uploads"


@pytest.fixture(scope="module")
def deployment(postgres_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowDeployment]:
    started = time.monotonic()
    home = tmp_path_factory.mktemp("trigger-airflow")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "comfy_workflows.py", dags)
    shutil.copy(EXAMPLES / "img2img.json", dags / "img2img.json")
    (dags / "img2img.comfy.yaml").write_text(SIDECAR)
    (home / "input").mkdir()
    database = migrated_airflow_database(postgres_server, "trigger", {**os.environ, "AIRFLOW_HOME": str(home)},
                                         airflow_bin=str(Path(sys.executable).with_name("airflow")))
    deployment = AirflowDeployment(home, database, dags, env={
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # runs are created, never started
        "AIRFLOW__COMFY__INPUT_PATH": str(home / "input"),
        "AIRFLOW__COMFY__INPUT_STORE": INPUT_STORE,
        "AIRFLOW__COMFY__ARTIFACT_STORE": f"file://{home}/artifacts",
        "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
    })
    with deployment:
        deployment.wait_for_dags({"img2img"})
        deployment.wait_for_api()
        print(f"deployment ready in {time.monotonic() - started:.1f} s")
        yield deployment


def trigger(deployment: AirflowDeployment, run_id: str, conf: dict) -> tuple[int, str]:
    status, body = deployment.rest("POST", "/api/v2/dags/img2img/dagRuns",
                                   {"dag_run_id": run_id, "logical_date": None, "conf": conf})
    return status, body.get("detail", "") if isinstance(body, dict) else str(body)


def test_the_form_offers_the_image_param_with_what_it_accepts_and_the_sampler_choices(deployment):
    from airflow_comfy.workflow.core_nodes import SUPPORTED_SAMPLERS, SUPPORTED_SCHEDULERS

    status, details = deployment.rest("GET", "/api/v2/dags/img2img/details")
    assert status == 200, details
    params = details["params"]
    image = params["image"]
    assert image["value"] == "demo-input.png" and "pattern" not in image["schema"]
    assert "s3:// URI in the input store" in image["description"]
    assert params["sampler"]["schema"]["enum"] == list(SUPPORTED_SAMPLERS)
    assert params["scheduler"]["schema"]["enum"] == list(SUPPORTED_SCHEDULERS)
    assert (params["sampler"]["value"], params["scheduler"]["value"]) == ("dpmpp_2m", "karras")  # the workflow's


def test_a_bad_input_image_is_refused_at_trigger_with_a_sentence(deployment):
    home = deployment.home
    refused = {
        "traversal": ("../secret.png", "'../secret.png' leaves the input folder"),
        "other-bucket": ("s3://other/x.png", f"'s3://other/x.png' is not in the input store ({INPUT_STORE}/)"),
        "gif": ("x.gif", "'x.gif' is not an image type the runner reads (png, jpg, jpeg, webp)"),
        "file-outside": (f"file://{home}/secret.png",
                         f"'file://{home}/secret.png' is not in the input folder (file://{home}/input/)"),
    }
    for run_id, (value, sentence) in refused.items():
        status, detail = trigger(deployment, run_id, {"image": value})
        assert status == 400, (run_id, status, detail)
        assert f"Invalid input for param image: {sentence}" in detail, detail
        assert "does not match" not in detail and "(?!" not in detail, detail
    accepted = {"store": f"{INPUT_STORE}/cat.png", "file-inside": f"file://{home}/input/shots/cat.webp",
                "name": "shots/cat.jpg"}
    for run_id, value in accepted.items():
        status, detail = trigger(deployment, run_id, {"image": value})
        assert status == 200, (run_id, status, detail)
    status, detail = trigger(deployment, "bad-sampler", {"sampler": "magic"})
    assert status == 400 and "'magic' is not one of" in detail, detail
    assert trigger(deployment, "good-sampler", {"sampler": "euler_ancestral", "scheduler": "karras"})[0] == 200
    created = {row[0] for row in deployment.sql("SELECT run_id FROM dag_run WHERE dag_id = 'img2img'")}
    assert created == {*accepted, "good-sampler"}


def test_a_chosen_sampler_reaches_the_runner(demo_models: Path, demo_inputs: Path, airflow_env, run_airflow):
    home = Path(tempfile.mkdtemp(prefix="sampler-airflow-"))
    try:
        dags = home / "dags"
        dags.mkdir()
        shutil.copy(REPO / "dags" / "comfy_workflows.py", dags)
        shutil.copy(EXAMPLES / "txt2img.json", dags / "sampler_choice.json")
        (dags / "sampler_choice.comfy.yaml").write_text(SIDECAR + "slicing: single\n")
        store = home / "artifacts"
        env = airflow_env(home, dags, artifact_store=store.as_uri(), models_path=str(demo_models),
                          input_path=str(demo_inputs), cache_dir=str(home / "cache"), runner_python=sys.executable,
                          runner_service="false")
        env["COMFY_RUNNER_THREADS"] = "1"
        run_airflow("db", "migrate", env=env)
        conf = {"sampler": "euler_ancestral", "scheduler": "karras", "steps": 2}
        proc = run_airflow("dags", "test", "sampler_choice", "-c", json.dumps(conf), env=env, timeout=600)
        assert "state=success" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-5000:]
        (image,) = (store / "runs" / "sampler_choice").glob("*/outputs/*.png")
        snapshot = json.loads(next(image.parent.glob("snapshot.*.json")).read_text())
        assert (snapshot["params"]["sampler"], snapshot["params"]["scheduler"]) == ("euler_ancestral", "karras")
        [sampler_node] = [n for n in snapshot["prompt"].values() if n["class_type"] == "KSampler"]
        assert (sampler_node["inputs"]["sampler_name"], sampler_node["inputs"]["scheduler"]) == (
            "euler_ancestral", "karras")
        with Image.open(image) as png:  # what ComfyUI would load back from the picture
            [embedded] = [n for n in json.loads(png.text["prompt"]).values() if n["class_type"] == "KSampler"]
        assert embedded["inputs"]["sampler_name"] == "euler_ancestral"
    finally:
        shutil.rmtree(home, ignore_errors=True)
