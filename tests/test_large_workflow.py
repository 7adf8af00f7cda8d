"""A workflow of several MB runs end to end: the group spec travels through the artifact store, never on the
command line (Linux refuses one argument over 128 KiB; the output group's spec carries the whole UI workflow
for the PNG metadata).

The workflow is the txt2img UI example whose Note node holds 4.5 MB of text, under the default
``[comfy] max_workflow_bytes`` of 5 MB. It runs through ``airflow-comfy run`` (runner subprocesses) and
through ``airflow dags test`` (the DAG factory's stubs, the local operator, runner subprocesses).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from airflow_comfy.local_run import compile_for_run

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
ARG_MAX_ONE = 128 * 1024  # Linux's MAX_ARG_STRLEN
NOTE_BYTES = 4_500_000


@pytest.fixture(scope="module")
def big_workflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    doc = json.loads((ROOT / "example_workflows" / "txt2img.json").read_text(encoding="utf-8"))
    note = next(n for n in doc["nodes"] if n["type"] == "Note")
    words = "ComfyUI notes can hold a whole style guide. "
    note["widgets_values"] = [words * (NOTE_BYTES // len(words))]
    path = tmp_path_factory.mktemp("big") / "big_notes.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert 4_000_000 < path.stat().st_size < 5_000_000
    return path


def png_workflow_chunk(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["workflow"])


def test_its_output_group_spec_would_not_fit_one_argument(big_workflow: Path):
    compiled = compile_for_run(big_workflow)
    sizes = {g["task_id"]: len(json.dumps(g["spec"])) for g in compiled.groups}
    assert max(sizes.values()) > 30 * ARG_MAX_ONE, sizes


def test_airflow_comfy_run(big_workflow: Path, demo_models: Path, demo_inputs: Path, tmp_path: Path):
    command = [str(Path(sys.executable).with_name("airflow-comfy")), "run", str(big_workflow),
               "--models", str(demo_models), "--input-dir", str(demo_inputs), "--output", str(tmp_path / "out"),
               "--run-id", "big", "--param", "steps=4"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, COMFY_RUNNER_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = [Path(line[len("output: "):]) for line in proc.stdout.splitlines() if line.startswith("output: ")]
    assert len(outputs) == 1
    note = next(n for n in png_workflow_chunk(outputs[0])["nodes"] if n["type"] == "Note")
    assert len(note["widgets_values"][0]) > NOTE_BYTES - 100
    specs = list((tmp_path / "out" / "specs" / "sha256").glob("*.json"))
    assert len(specs) == 2 and max(p.stat().st_size for p in specs) > 30 * ARG_MAX_ONE


def test_airflow_dags_test(big_workflow: Path, demo_models: Path, demo_inputs: Path, tmp_path: Path,
                           airflow_env, run_airflow):
    home = tmp_path / "airflow"
    dags = home / "dags"
    dags.mkdir(parents=True)
    for stub in ("comfy_workflows.py", "comfy_workflow_errors.py"):
        shutil.copy(ROOT / "dags" / stub, dags / stub)
    shutil.copy(big_workflow, dags / big_workflow.name)
    store = tmp_path / "artifacts"
    env = airflow_env(home, dags, artifact_store=store.as_uri(), models_path=str(demo_models),
                      input_path=str(demo_inputs), cache_dir=str(home / "cache"), runner_python=sys.executable)
    env["COMFY_RUNNER_THREADS"] = "1"
    run_airflow("db", "migrate", env=env)
    proc = run_airflow("dags", "test", "big_notes", "-c", json.dumps({"steps": 4}), env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert "state=success" in output, output[-5000:]
    # the task log names the spec by URI and hash (no masked blob of base64)
    spec_lines = [line for line in output.splitlines() if "Group spec: file://" in line]
    assert len(spec_lines) == 2, output[-5000:]
    assert "eyJ" not in output
    (image,) = (store / "runs" / "big_notes").glob("*/outputs/*.png")
    # the run's params: the trigger's steps over the DAG's defaults (the tasks carry no copy of the DAG's params;
    # Airflow merges them in when the task runs)
    snapshot = json.loads((image.parent / "snapshot.postprocess.json").read_text())
    assert snapshot["params"]["steps"] == 4
    assert snapshot["params"]["prompt"] == "a lighthouse on a cliff at dawn, oil painting"
    assert snapshot["params"]["seed"] == 42
    note = next(n for n in png_workflow_chunk(image)["nodes"] if n["type"] == "Note")
    assert len(note["widgets_values"][0]) > NOTE_BYTES - 100
