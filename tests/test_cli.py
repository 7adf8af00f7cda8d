"""The ``airflow-comfy`` command line, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from workflow_builders import EXAMPLES, OBJECT_INFO, TEMPLATES, data_file, txt2img, write

from airflow_comfy.cli import main
from airflow_comfy.local_run import compile_for_run
from airflow_comfy.workflow.groupspec import GroupSpec


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_ui_template_gives_comfyuis_api_prompt(capsys):
    code, out, _ = run_cli(capsys, "convert", TEMPLATES / "default.json")
    assert code == 0
    prompt = json.loads(out)
    assert prompt["3"]["class_type"] == "KSampler"
    assert prompt["3"]["inputs"] == {
        "seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    assert prompt["9"]["inputs"] == {"filename_prefix": "ComfyUI", "images": ["8", 0]}
    assert list(prompt) == ["3", "4", "5", "6", "7", "8", "9"]


def test_convert_with_object_info_handles_nodes_the_runner_cannot_run(capsys):
    object_info = data_file(OBJECT_INFO)
    code, _, err = run_cli(capsys, "convert", TEMPLATES / "flux_schnell.json")
    assert code == 2 and "unknown node type" in err and "flux_schnell.json" in err
    code, out, _ = run_cli(capsys, "convert", TEMPLATES / "flux_schnell.json", "--object-info", object_info)
    assert code == 0
    assert any(node["class_type"] == "UNETLoader" or node["class_type"] == "CheckpointLoaderSimple"
               for node in json.loads(out).values())


def test_convert_reports_bad_file_clearly(tmp_path, capsys):
    bad = write(tmp_path / "broken.json", '{"nodes": [')
    code, _, err = run_cli(capsys, "convert", bad)
    assert code == 2 and "broken.json" in err and "JSON" in err


def test_slice_text_and_json(capsys):
    code, out, _ = run_cli(capsys, "slice", EXAMPLES / "txt2img_grouped.json")
    assert code == 0
    assert "[sampling]  <- prompts" in out and "CheckpointLoaderSimple  (replayed: MODEL)" in out
    assert "reads LATENT of node 5 output 0 from [sampling]" in out
    code, out, _ = run_cli(capsys, "slice", EXAMPLES / "txt2img_grouped.json", "--json")
    data = json.loads(out)
    assert [g["task_id"] for g in data["groups"]] == ["prompts", "sampling", "decode_and_save"]
    spec = GroupSpec.from_dict(data["groups"][2]["spec"])
    assert spec.components == {"1": ["VAE"]} and spec.output_nodes == ["7"]
    assert "filename_prefix" in {p["name"] for p in data["params"]}  # declared in the sidecar


def test_slice_refuses_invalid_workflow(tmp_path, capsys):
    path = write(tmp_path / "wf.json", txt2img(**{"3.steps": 0}))
    code, _, err = run_cli(capsys, "slice", path)
    assert code == 2 and "wf.json: node 3 (KSampler): input 'steps'" in err


def airflow_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/airflow.db",
        "AIRFLOW__COMFY__CACHE_DIR": "",
    })
    return env


def cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airflow_comfy.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.airflow
def test_render_pods_are_valid_kubernetes_pods(tmp_path):
    result = cli("render-pods", EXAMPLES / "txt2img_grouped.json", env=airflow_env(tmp_path))
    assert result.returncode == 0, result.stderr
    pods = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    shas = {g["task_id"]: g["spec_sha256"] for g in compile_for_run(EXAMPLES / "txt2img_grouped.json").groups}
    assert [p["metadata"]["labels"]["airflow-comfy/group"] for p in pods] == ["prompts", "sampling",
                                                                              "decode_and_save"]
    for pod in pods:
        for version in ("1.30.0", "1.37.0"):
            kubernetes_validate.validate(pod, version, strict=True)
        container = pod["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "airflow_comfy.runner"]
        args = container["args"]
        sha = shas[pod["metadata"]["labels"]["airflow-comfy/group"]]
        assert args[args.index("--spec") + 1].endswith(f"/specs/sha256/{sha}.json")  # the spec by content address
        assert args[args.index("--spec-sha256") + 1] == sha
    sampling = pods[1]["spec"]
    # The sidecar's per-task settings reach the pod.
    assert sampling["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert sampling["nodeSelector"] == {"gpu-class": "large"}


@pytest.mark.airflow
def test_check_lists_good_and_bad_workflows(tmp_path):
    folder = tmp_path / "wfs"
    folder.mkdir()
    write(folder / "good.json", txt2img())
    write(folder / "bad.json", txt2img(**{"3.sampler_name": "nope"}))
    result = cli("check", folder, env=airflow_env(tmp_path))
    assert result.returncode == 2
    assert "DAGs of comfy_workflows.py:\n  good  (good.json): 2 task(s): inference, postprocess\n" in result.stdout
    assert "Import errors:\n  comfy_workflow_errors.py: ComfyWorkflowImportError: airflow-comfy: 1 workflow" in result.stdout
    assert "bad.json: node 3 (KSampler): input 'sampler_name'" in result.stdout
    assert "1 DAG(s); 1 workflow file(s) named in the import error of comfy_workflow_errors.py" in result.stdout


def test_gc_removes_what_uncommitted_tries_left(tmp_path: Path, capsys):
    """A store as killed tries leave it: try 1 of group g died after publishing (its values, an image it published
    and try 2 did not publish again, a temporary file, its failure record); try 2 committed, but died before
    removing its staging copies. Group h never committed."""
    import hashlib
    import time

    from airflow_comfy.artifacts import layout
    from airflow_comfy.artifacts.manifest import GroupManifest, ImageRecord
    from airflow_comfy.artifacts.store import TMP_PREFIX, open_store

    store, run = open_store(tmp_path), "wf/r1"
    png, old = b"png bytes", b"an image only try 1 made"
    store.put_bytes(layout.output_key(run, "g", 1, "5", 0, "safetensors"), b"latent")
    store.put_json(layout.published_key(run, "g", 1), {"images": {"x_00001_.png": hashlib.sha256(png).hexdigest(),
                                                                  "old_00001_.png": hashlib.sha256(old).hexdigest()}})
    store.put_bytes(layout.try_failure_key(run, "g", 1), b"{}")
    store.put_bytes(layout.image_key(run, "old_00001_.png"), old)
    store.put_bytes(layout.image_key(run, "x_00001_.png"), png)
    store.put_bytes(layout.staged_image_key(run, "g", 2, "7", "", "x_00001_.png"), png)
    store.put_json(layout.published_key(run, "g", 2), {"images": {"x_00001_.png": hashlib.sha256(png).hexdigest()}})
    image = ImageRecord(node="7", uri=store.uri(layout.image_key(run, "x_00001_.png")), filename="x_00001_.png",
                        width=8, height=8, sha256=hashlib.sha256(png).hexdigest())
    manifest = GroupManifest(workflow_name="wf", workflow_sha256="", group="g", run_key=run, try_number=2,
                             images=[image])
    store.put_json(layout.manifest_key(run, "g", 2), manifest.to_dict())
    store.put_bytes(layout.output_key(run, "h", 1, "3", 0, "json"), b"1")
    stale = tmp_path / "runs" / "wf" / "r1" / "g" / "try-1" / f"{TMP_PREFIX}x.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    before = store.list()

    assert main(["gc", "--store", tmp_path.as_uri(), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 6 object(s)" in out and store.list() == before and stale.exists()
    assert main(["gc", "--store", tmp_path.as_uri()]) == 0
    out = capsys.readouterr().out
    assert "removed 6 object(s)" in out and "left alone (never committed; --unfinished cleans it): wf/r1 h" in out
    assert store.list() == sorted([layout.try_failure_key(run, "g", 1), layout.manifest_key(run, "g", 2),
                                   layout.image_key(run, "x_00001_.png"),
                                   layout.output_key(run, "h", 1, "3", 0, "json")])
    assert not stale.exists()
    assert main(["gc", "--store", tmp_path.as_uri(), "--run", run, "--unfinished"]) == 0
    assert "removed 1 object(s)" in capsys.readouterr().out
    assert not store.exists(layout.output_key(run, "h", 1, "3", 0, "json"))
