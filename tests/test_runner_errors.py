"""The runner's failures: bad input exits with code 2 and a message that names the node id, its class type and the
input (and the file); an infrastructure failure (the store) exits with code 1, which Airflow retries.

Most cases call the runner's ``main`` in-process with the argv ``airflow-comfy run`` would give the subprocess,
built from an example's compiled group spec with one input changed: the runner must refuse what the Airflow side
would normally have caught, too. Two cases run ``python -m airflow_comfy.runner`` as a real subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from airflow_comfy.artifacts.manifest import GroupManifest, OutputRecord
from airflow_comfy.artifacts.specs import publish_spec
from airflow_comfy.artifacts.store import open_store
from airflow_comfy.local_run import compile_for_run
from airflow_comfy.log_lines import parse_line
from airflow_comfy.operators.command import local_arguments, runner_arguments, runner_prefix
from airflow_comfy.runner.cli import main as runner_main
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.groupspec import GroupSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
BAD_INPUT, INFRASTRUCTURE = 2, 1


@pytest.fixture(scope="module")
def models(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo models that the tests may add broken files to."""
    root = tmp_path_factory.mktemp("models") / "models"
    shutil.copytree(demo_models, root)
    return root


@pytest.fixture(scope="module")
def inputs(demo_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs") / "input"
    shutil.copytree(demo_inputs, root)
    (root / "not-an-image.png").write_bytes(b"this is not a PNG file\n")
    Image.new("RGB", (4, 4), (200, 100, 50)).save(root / "tiny.png")
    return root


@dataclass
class Failure:
    returncode: int
    stderr: str


@pytest.fixture
def run_group(models: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> Callable[..., Failure]:
    """``run_group(workflow, change=None, group=0, ...)``: run one group of an example in-process; ``change``
    edits the group spec's dict (or ``spec_uri``, a data: URI, replaces the spec). Returns the exit code and
    stderr."""

    def run(workflow: str, change: Callable[[dict], Any] | None = None, *, group: int = 0,
            single_group: bool = True, params: dict | str | None = None, store: str | None = None,
            input_uris: list[str] | None = None, spec_uri: str | None = None) -> Failure:
        compiled = compile_for_run(EXAMPLES / workflow, single_group=single_group)
        data = json.loads(json.dumps(compiled.groups[group]["spec"]))
        if change:
            change(data)
        spec = GroupSpec.from_dict(data)
        argv = runner_arguments(
            spec, store=store or (tmp_path / "store").as_uri(), models_path=str(models),
            input_path=str(inputs), run_key=f"{compiled.dag_id}/{uuid.uuid4().hex[:8]}",
            try_number="1", params=params if isinstance(params, str) else json.dumps(params or {}),
            input_uris=input_uris or [])
        # the spec is published where the task would put it, or (for a store these tests make unwritable) in a
        # store of its own: the runner reads a spec outside --store by its full URI
        spec_store = open_store(store if store and not store.startswith("file:///proc") else tmp_path / "specs")
        argv[argv.index("--spec") + 1] = spec_uri or publish_spec(spec_store, spec.to_bytes(), spec.sha256())
        capsys.readouterr()
        returncode = runner_main(local_arguments(argv, str(tmp_path / "manifest.json")) + ["--threads", "1"])
        captured = capsys.readouterr()
        assert not (tmp_path / "manifest.json").exists() or returncode == 0
        return Failure(returncode, captured.err)

    return run


def set_input(node: str, name: str, value: Any) -> Callable[[dict], None]:
    def change(spec: dict) -> None:
        spec["nodes"][node]["inputs"][name] = value

    return change


def assert_bad_input(failure: Failure, *parts: str) -> None:
    assert failure.returncode == BAD_INPUT, failure.stderr[-3000:]
    level, last = parse_line(failure.stderr.strip().splitlines()[-1])
    assert level == logging.ERROR and last.startswith("airflow-comfy runner: bad input: "), failure.stderr[-3000:]
    assert "Traceback" not in failure.stderr  # a clear message, not a stack trace
    for part in parts:
        assert part in last, f"{part!r} not in {last!r}"


# --- model files ---------------------------------------------------------------------------------------------


def test_missing_model_file(run_group):
    failure = run_group("txt2img_api.json", set_input("1", "ckpt_name", "missing.safetensors"))
    assert_bad_input(failure, "node 1 (CheckpointLoaderSimple)", "input 'ckpt_name'", "'missing.safetensors'",
                     "not found", "demo-sd15-tiny.safetensors")


def test_pickle_checkpoint_is_refused(run_group, models: Path):
    (models / "checkpoints" / "legacy.ckpt").write_bytes(b"\x80\x04\x95 pickled weights")
    failure = run_group("txt2img_api.json", set_input("1", "ckpt_name", "legacy.ckpt"))
    assert_bad_input(failure, "node 1 (CheckpointLoaderSimple)", "input 'ckpt_name'", "checkpoints/legacy.ckpt",
                     "pickle", "safetensors")


def test_corrupt_safetensors(run_group, models: Path):
    (models / "checkpoints" / "corrupt.safetensors").write_bytes(os.urandom(4096))
    failure = run_group("txt2img_api.json", set_input("1", "ckpt_name", "corrupt.safetensors"))
    assert_bad_input(failure, "node 1 (CheckpointLoaderSimple)", "input 'ckpt_name'",
                     "checkpoints/corrupt.safetensors", "not a valid safetensors file")


def test_truncated_lora(run_group, models: Path):
    whole = (models / "loras" / "demo-lora.safetensors").read_bytes()
    (models / "loras" / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    failure = run_group("lora.json", set_input("20", "lora_name", "truncated.safetensors"))
    assert_bad_input(failure, "node 20 (LoraLoader)", "input 'lora_name'", "truncated.safetensors")


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd.safetensors", "sub/../../x.safetensors"])
def test_model_path_escape(run_group, name: str):
    failure = run_group("txt2img_api.json", set_input("1", "ckpt_name", name))
    assert_bad_input(failure, "node 1 (CheckpointLoaderSimple)", "input 'ckpt_name'", repr(name))


def test_model_symlink_out_of_the_models_folder(run_group, models: Path, tmp_path: Path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(models / "checkpoints" / "demo-sd15-tiny.safetensors", outside)
    (models / "checkpoints" / "link.safetensors").symlink_to(outside)
    failure = run_group("txt2img_api.json", set_input("1", "ckpt_name", "link.safetensors"))
    assert_bad_input(failure, "node 1 (CheckpointLoaderSimple)", "input 'ckpt_name'", "outside the models folder")


def test_compiling_refuses_path_escapes_before_any_runner(tmp_path: Path):
    workflow = json.loads((EXAMPLES / "inpaint.json").read_text(encoding="utf-8"))
    workflow["10"]["inputs"]["image"] = "../../etc/passwd"
    path = tmp_path / "escape.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    with pytest.raises(WorkflowError,
                       match=r"node 10 \(LoadImage\).*'image'.*'\.\./\.\./etc/passwd' leaves the input folder"):
        compile_for_run(path)


# --- input images --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../models/checkpoints/demo-sd15-tiny.safetensors", "/etc/hostname",
                                  "demo-input.png [output]"])
def test_input_image_path_escape(run_group, name: str):
    failure = run_group("img2img.json", set_input("10", "image", name))
    assert_bad_input(failure, "node 10 (LoadImage)", "input 'image'", repr(name))


def test_missing_input_image(run_group):
    failure = run_group("img2img.json", set_input("10", "image", "nowhere.png"))
    assert_bad_input(failure, "node 10 (LoadImage)", "input 'image'", "'nowhere.png' not found")


def test_missing_files_are_reported_before_any_model_is_loaded(run_group, models: Path):
    """The checkpoint loader (node 1) runs before LoadImage (node 10); the checkpoint named here is not a
    safetensors file, so reading it would fail with another message: the missing image is found first."""
    (models / "checkpoints" / "unreadable.safetensors").write_bytes(b"never read by this test\n")

    def change(spec: dict) -> None:
        spec["nodes"]["1"]["inputs"]["ckpt_name"] = "unreadable.safetensors"
        spec["nodes"]["10"]["inputs"]["image"] = "nowhere.png"

    failure = run_group("img2img.json", change)
    assert_bad_input(failure, "node 10 (LoadImage)", "input 'image'", "'nowhere.png' not found")
    assert "not a valid safetensors file" not in failure.stderr and "CheckpointLoaderSimple" not in failure.stderr

    def missing_lora(spec: dict) -> None:
        spec["nodes"]["1"]["inputs"]["ckpt_name"] = "unreadable.safetensors"
        spec["nodes"]["20"]["inputs"]["lora_name"] = "gone.safetensors"

    failure = run_group("lora.json", missing_lora)
    assert_bad_input(failure, "node 20 (LoraLoader)", "input 'lora_name'", "'gone.safetensors' not found")


def test_input_that_is_not_an_image(run_group):
    failure = run_group("img2img.json", set_input("10", "image", "not-an-image.png"))
    assert_bad_input(failure, "node 10 (LoadImage)", "input 'image'", "not-an-image.png")


def test_mask_that_is_not_an_image(run_group):
    failure = run_group("inpaint.json", set_input("11", "image", "not-an-image.png"))
    assert_bad_input(failure, "node 11 (LoadImageMask)", "input 'image'", "not-an-image.png")


@pytest.mark.parametrize(("workflow", "node", "class_type"), [("img2img.json", "12", "VAEEncode"),
                                                               ("inpaint.json", "12", "VAEEncodeForInpaint")])
def test_image_smaller_than_the_vae_needs(run_group, workflow: str, node: str, class_type: str):
    def change(spec: dict) -> None:
        spec["nodes"]["10"]["inputs"]["image"] = "tiny.png"
        spec["nodes"][node]["inputs"]["pixels"] = ["10", 0]  # img2img: around its ImageScale

    failure = run_group(workflow, change)
    assert_bad_input(failure, f"node {node} ({class_type})", "input 'pixels'", "4×4", "at least 8×8")


# --- boundary values -----------------------------------------------------------------------------------------


def test_missing_upstream_manifest(run_group):
    failure = run_group("txt2img_api.json", group=1, single_group=False)
    assert_bad_input(failure, "node 6 (VAEDecode)", "input 'samples'", "output 0 of node 5",
                     "group 'inference'", "no --inputs manifest provides it")


def _manifest(store_uri: str, outputs: list[OutputRecord]) -> str:
    store = open_store(store_uri)
    manifest = GroupManifest(workflow_name="txt2img_api", workflow_sha256="", group="inference",
                             run_key="txt2img_api/upstream", try_number=1, outputs=outputs)
    return store.put_json(f"upstream/{uuid.uuid4().hex}/manifest.json", manifest.to_dict())


def test_upstream_manifest_without_the_value(run_group, tmp_path: Path):
    store = (tmp_path / "store").as_uri()
    uri = _manifest(store, [])
    failure = run_group("txt2img_api.json", group=1, single_group=False, store=store, input_uris=[uri])
    assert_bad_input(failure, "node 6 (VAEDecode)", "input 'samples'", "output 0 of node 5")


def test_corrupt_upstream_manifest(run_group, tmp_path: Path):
    store = (tmp_path / "store").as_uri()
    uri = open_store(store).put_bytes("upstream/manifest.json", b'{"schema": "something else"}')
    failure = run_group("txt2img_api.json", group=1, single_group=False, store=store, input_uris=[uri])
    assert_bad_input(failure, "invalid group manifest", uri)


def test_corrupt_boundary_value(run_group, tmp_path: Path):
    store_uri = (tmp_path / "store").as_uri()
    value = open_store(store_uri).put_bytes("upstream/5/0.safetensors", os.urandom(256))
    record = OutputRecord(node="5", output=0, type="LATENT", uri=value, sha256="0" * 64, bytes=256)
    uri = _manifest(store_uri, [record])
    failure = run_group("txt2img_api.json", group=1, single_group=False, store=store_uri, input_uris=[uri])
    assert_bad_input(failure, "node 6 (VAEDecode)", "input 'samples'", value, "does not match its manifest")


# --- params and the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "parts"), [
    ({"seed": -1}, ["node 5 (KSampler)", "input 'seed'", "-1", "min"]),
    ({"seed": 2**64}, ["node 5 (KSampler)", "input 'seed'", "max"]),
    ({"steps": 0}, ["node 5 (KSampler)", "input 'steps'"]),
    ({"cfg": "lots"}, ["node 5 (KSampler)", "input 'cfg'", "'lots'"]),
    ({"prompt": {"not": "text"}}, ["node 2 (CLIPTextEncode)", "input 'text'"]),
])
def test_invalid_params_are_validated_again_by_the_runner(run_group, params: dict, parts: list[str]):
    assert_bad_input(run_group("txt2img_api.json", params=params), *parts)


@pytest.mark.parametrize("params", ["{not json", "[1, 2]"])
def test_params_must_be_a_json_object(run_group, params: str):
    assert_bad_input(run_group("txt2img_api.json", params=params), "--params")


def test_unsupported_spec_version(run_group):
    spec = compile_for_run(EXAMPLES / "txt2img_api.json", single_group=True).groups[0]["spec"]
    future = dict(spec, version=99)
    uri = "data:application/json;base64," + base64.b64encode(json.dumps(future).encode()).decode()
    failure = run_group("txt2img_api.json", spec_uri=uri)
    assert_bad_input(failure, "group spec version 99 is not supported", "same airflow-comfy version")


def test_not_a_spec(run_group):
    uri = "data:application/json;base64," + base64.b64encode(b'{"hello": "world"}').decode()
    assert_bad_input(run_group("txt2img_api.json", spec_uri=uri), "cannot read the group spec")


def test_store_spec_needs_its_hash(run_group, tmp_path: Path):
    spec = GroupSpec.from_dict(compile_for_run(EXAMPLES / "txt2img_api.json", single_group=True).groups[0]["spec"])
    uri = publish_spec(open_store(tmp_path / "specs"), spec.to_bytes(), spec.sha256())
    from airflow_comfy.runner.cli import main

    code = main(["run", "--spec", uri, "--store", (tmp_path / "store").as_uri(), "--run-key", "d/r",
                 "--models", str(tmp_path), "--input-dir", str(tmp_path)])
    assert code == BAD_INPUT


# --- infrastructure ------------------------------------------------------------------------------------------


def test_damaged_or_missing_spec_is_an_infrastructure_failure(run_group, tmp_path: Path, capsys):
    """The object at the spec's content address does not hash to --spec-sha256 (or is gone): retryable, since
    the task's next try publishes it again (publish_spec replaces a damaged copy)."""
    from airflow_comfy.runner.cli import main

    spec = GroupSpec.from_dict(compile_for_run(EXAMPLES / "txt2img_api.json", single_group=True).groups[0]["spec"])
    store = open_store(tmp_path / "store")
    uri = publish_spec(store, spec.to_bytes(), spec.sha256())
    path = Path(uri.removeprefix("file://"))
    path.write_bytes(path.read_bytes().replace(b"KSampler", b"KSamplor"))
    argv = ["run", "--spec", uri, "--spec-sha256", spec.sha256(), "--store", store.root_uri, "--run-key", "d/r",
            "--models", str(tmp_path), "--input-dir", str(tmp_path)]
    capsys.readouterr()
    assert main(argv) == INFRASTRUCTURE
    assert f"hashes to {hashlib.sha256(path.read_bytes()).hexdigest()}, not to --spec-sha256" in capsys.readouterr().err
    assert publish_spec(store, spec.to_bytes(), spec.sha256()) == uri  # repaired
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256()
    path.unlink()
    assert main(argv) == INFRASTRUCTURE
    assert "no artifact at" in capsys.readouterr().err



def test_unwritable_store_is_refused_before_anything_is_computed(run_group):
    """A location that cannot be written (here: one that cannot exist) fails the preflight probe, in one
    sentence; no retry can make it writable, so it is not retried."""
    failure = run_group("txt2img_api.json", store="file:///proc/forbidden")
    assert failure.returncode == BAD_INPUT, failure.stderr[-3000:]
    [line] = failure.stderr.strip().splitlines()
    line = parse_line(line)[1]
    assert line.startswith("airflow-comfy runner: bad input: the artifact store file:///proc/forbidden cannot be "
                           "written (cannot write file:///proc/forbidden/runs/"), line
    assert "No such file or directory" in line and "Traceback" not in failure.stderr


# --- through a real process ----------------------------------------------------------------------------------


def _subprocess_run(spec: GroupSpec, *, store: str, models: Path, inputs: Path, tmp_path: Path):
    argv = runner_arguments(spec, store=store, models_path=str(models), input_path=str(inputs),
                            run_key="errors/subprocess", try_number="1", params="{}", input_uris=[])
    argv[argv.index("--spec") + 1] = publish_spec(open_store(tmp_path / "specs"), spec.to_bytes(), spec.sha256())
    command = runner_prefix(sys.executable) + local_arguments(argv, str(tmp_path / "manifest.json"))
    return subprocess.run(command + ["--threads", "1"], capture_output=True, text=True, timeout=300)


def test_runner_process_exit_codes(models: Path, inputs: Path, tmp_path: Path):
    compiled = compile_for_run(EXAMPLES / "inpaint.json", single_group=True)
    spec = GroupSpec.from_dict(compiled.groups[0]["spec"])
    spec.nodes["10"]["inputs"]["image"] = "../escape.png"
    proc = _subprocess_run(spec, store=(tmp_path / "store").as_uri(), models=models, inputs=inputs,
                           tmp_path=tmp_path)
    assert proc.returncode == BAD_INPUT, proc.stderr[-3000:]
    assert "node 10 (LoadImage): input 'image'" in proc.stderr and "Traceback" not in proc.stderr

    # The preprocess group (LoadImage, LoadImageMask, VAEEncodeForInpaint) would write its latent into a store it
    # cannot write: the preflight probe finds out first, before torch is even imported.
    compiled = compile_for_run(EXAMPLES / "inpaint.json")
    assert compiled.groups[0]["task_id"] == "preprocess"
    spec = GroupSpec.from_dict(compiled.groups[0]["spec"])
    proc = _subprocess_run(spec, store="file:///proc/forbidden", models=models, inputs=inputs, tmp_path=tmp_path)
    assert proc.returncode == BAD_INPUT, proc.stderr[-3000:]
    assert "bad input: the artifact store file:///proc/forbidden cannot be written" in proc.stderr
    assert "node 10" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "manifest.json").exists()


def test_upstream_manifest_outside_the_store_is_bad_input(tmp_path: Path):
    from airflow_comfy.runner.cli import main

    code = main(["run", "--spec", GroupSpec(workflow_name="w", workflow_sha256="", group="g", nodes={}).to_data_uri(),
                 "--store", (tmp_path / "store").as_uri(), "--run-key", "d/r",
                 "--inputs", (tmp_path / "elsewhere" / "manifest.json").as_uri(),
                 "--models", str(tmp_path), "--input-dir", str(tmp_path)])
    assert code == BAD_INPUT
