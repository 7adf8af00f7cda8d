"""End to end: every example workflow (and ``tests/data/all_nodes.json``) runs through the runner, sliced into
groups and as one group, on the tiny demo models, and gives bit-identical pixels either way.

Most runs call the runner's ``main`` in-process with the very argv the subprocess would get
(``run_workflow(..., in_process=True)``); one test goes through ``airflow-comfy run`` and its runner subprocesses.
Threads are pinned (``--threads 1``) so every group computes the same bits.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from airflow_comfy.artifacts.store import file_uri_path
from airflow_comfy.factory.compile import CompiledWorkflow
from airflow_comfy.local_run import LocalRunResult, compile_for_run, run_workflow
from airflow_comfy.runner.models import clear_cache
from airflow_comfy.runner.registry import check_registry
from airflow_comfy.version import __version__
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.core_nodes import CORE_NODES
from airflow_comfy.workflow.loader import load_workflow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
ALL_NODES = Path(__file__).resolve().parent / "data" / "all_nodes.json"
WORKFLOWS = [*EXAMPLES, ALL_NODES]
THREADS = ["--threads", "1"]
CHECKPOINT = "demo-sd15-tiny.safetensors"


def _is_ui_format(path: Path) -> bool:
    return isinstance(json.loads(path.read_text(encoding="utf-8")).get("nodes"), list)


@dataclass
class Run:
    workflow: Path
    compiled: CompiledWorkflow
    result: LocalRunResult

    def image_paths(self) -> dict[tuple[str, int], Path]:
        """(output node, index among that node's images) -> the PNG file."""
        paths: dict[tuple[str, int], Path] = {}
        for image in self.result.images:
            index = sum(1 for node, _ in paths if node == image["node"])
            paths[(image["node"], index)] = Path(file_uri_path(image["uri"]))
        return paths

    def pixels(self) -> dict[tuple[str, int], np.ndarray]:
        return {key: _decode(path) for key, path in self.image_paths().items()}

    def executed_class_types(self) -> set[str]:
        """Class types of the nodes that ran to completion (their ids are in the manifests' timings)."""
        specs = {group["task_id"]: group["spec"] for group in self.compiled.groups}
        return {specs[group]["nodes"][node_id]["class_type"]
                for group, manifest in self.result.manifests.items()
                for node_id in manifest["timings"]["nodes"]}

    def output_folder(self, store: Path) -> Path:
        dag_id, run_id = self.result.run_key.split("/", 1)
        return store / "runs" / dag_id / run_id / "outputs"


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def _png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        image.load()
        return dict(image.text)


class Runner:
    """Runs workflows in-process and remembers each (workflow, slicing, params) run for the other tests."""

    def __init__(self, models: Path, inputs: Path, store: Path):
        self.models, self.inputs, self.store = models, inputs, store
        self._runs: dict[Any, Run] = {}
        self._count = 0
        self.executed: set[str] = set()

    def __call__(self, workflow: Path, *, single_group: bool = False, params: dict | None = None,
                 sidecar: Path | None = None, reuse: bool = True) -> Run:
        key = (workflow, single_group, json.dumps(params or {}, sort_keys=True), sidecar)
        if reuse and key in self._runs:
            return self._runs[key]
        self._count += 1
        compiled = compile_for_run(workflow, single_group=single_group, sidecar=sidecar)
        result = run_workflow(compiled, models=self.models, input_dir=self.inputs, store=self.store.as_uri(),
                              params=params, run_id=f"run-{self._count}-{'single' if single_group else 'sliced'}",
                              extra_args=THREADS, in_process=True, echo=lambda _line: None)
        run = Run(workflow, compiled, result)
        self.executed |= run.executed_class_types()
        if reuse:
            self._runs[key] = run
        return run


@pytest.fixture(scope="module")
def runs(demo_models: Path, demo_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Runner:
    return Runner(demo_models, demo_inputs, tmp_path_factory.mktemp("store"))


def _assert_same_pixels(a: dict[tuple[str, int], np.ndarray], b: dict[tuple[str, int], np.ndarray]) -> None:
    assert a and a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), f"image {key} differs"


# --- sliced == single group ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_sliced_and_single_group_give_identical_pixels(runs: Runner, workflow: Path):
    sliced = runs(workflow)
    single = runs(workflow, single_group=True)
    assert len(sliced.compiled.groups) > 1
    assert len(single.compiled.groups) == 1
    # Every output node of the workflow saved something, and the manifests describe what is on disk.
    output_nodes = {nid for group in sliced.compiled.groups for nid in group["spec"]["output_nodes"]}
    assert {node for node, _ in sliced.image_paths()} == output_nodes
    for image in sliced.result.images:
        data = Path(file_uri_path(image["uri"])).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        assert Image.open(io.BytesIO(data)).size == (image["width"], image["height"])
    pixels = sliced.pixels()
    _assert_same_pixels(pixels, single.pixels())
    for key, array in pixels.items():
        assert len(np.unique(array)) > 1, f"image {key} is one flat colour"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_node_in_its_own_group_gives_identical_pixels(runs: Runner, workflow: Path, tmp_path: Path):
    """The finest slicing (a sidecar puts each computing node in a task of its own): every value between nodes
    crosses the artifact store, so memory layouts and dtypes of decoded boundary values must not change a bit."""
    catalog = Catalog.builtin()
    nodes = load_workflow(workflow, catalog).to_api()
    computed = [nid for nid, node in nodes.items()
                if not catalog.get(node["class_type"]).produces_only_unserializable]
    sidecar = tmp_path / "fine.comfy.yaml"
    sidecar.write_text(json.dumps({"groups": {f"node_{nid}": [nid] for nid in computed}}), encoding="utf-8")
    fine = runs(workflow, sidecar=sidecar)
    assert len(fine.compiled.groups) == len(computed)
    _assert_same_pixels(fine.pixels(), runs(workflow, single_group=True).pixels())


# --- seeds and prompts ---------------------------------------------------------------------------------------


def test_same_seed_same_pixels_other_seed_other_pixels(runs: Runner):
    workflow = ROOT / "example_workflows" / "txt2img.json"
    default = runs(workflow)
    seed = default.compiled.params[[p["name"] for p in default.compiled.params].index("seed")]["default"]
    again = runs(workflow, params={"seed": seed})
    _assert_same_pixels(default.pixels(), again.pixels())
    other = runs(workflow, params={"seed": seed + 1})
    assert not np.array_equal(default.pixels()[("7", 0)], other.pixels()[("7", 0)])
    prompt = json.loads(_png_text(other.image_paths()[("7", 0)])["prompt"])
    assert prompt["5"]["inputs"]["seed"] == seed + 1


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2m_sde"])
def test_sde_sampler_workflow_is_reproducible(runs: Runner, tmp_path: Path, sampler: str):
    """The SDE samplers' Brownian-tree noise (torchsde, seeded with the KSampler seed) gives the same pixels on
    every run and with any slicing, and other pixels than the ODE sampler the workflow ships with."""
    source = ROOT / "example_workflows" / "txt2img_api.json"
    prompt = json.loads(source.read_text(encoding="utf-8"))
    assert prompt["5"]["class_type"] == "KSampler"
    prompt["5"]["inputs"]["sampler_name"] = sampler
    workflow = tmp_path / f"txt2img_{sampler}.json"
    workflow.write_text(json.dumps(prompt), encoding="utf-8")
    sliced = runs(workflow, reuse=False)
    _assert_same_pixels(sliced.pixels(), runs(workflow, single_group=True, reuse=False).pixels())
    _assert_same_pixels(sliced.pixels(), runs(workflow, reuse=False).pixels())
    assert not np.array_equal(sliced.pixels()[("7", 0)], runs(source).pixels()[("7", 0)])
    assert len(np.unique(sliced.pixels()[("7", 0)])) > 1


def test_prompt_param_changes_pixels_and_png_metadata(runs: Runner, demo_models: Path):
    workflow = ROOT / "example_workflows" / "txt2img.json"
    default = runs(workflow)
    text = "a green forest in the rain"
    changed = runs(workflow, params={"prompt": text})
    assert not np.array_equal(default.pixels()[("7", 0)], changed.pixels()[("7", 0)])
    path = changed.image_paths()[("7", 0)]
    chunks = _png_text(path)
    assert json.loads(chunks["prompt"])["2"]["inputs"]["text"] == text
    ui = json.loads(chunks["workflow"])
    assert isinstance(ui["nodes"], list) and {n["type"] for n in ui["nodes"]} >= {"KSampler", "SaveImage"}

    # The run snapshot beside the images: params, package version, model hashes.
    snapshots = sorted(path.parent.glob("snapshot.*.json"))
    assert [p.name for p in snapshots] == ["snapshot.postprocess.json"]
    snapshot = json.loads(snapshots[0].read_text(encoding="utf-8"))
    defaults = {p["name"]: p["default"] for p in changed.compiled.params}
    assert snapshot["params"] == defaults | {"prompt": text}
    assert snapshot["package_version"] == __version__
    checkpoint = demo_models / "checkpoints" / CHECKPOINT
    assert snapshot["models"] == {f"checkpoints/{CHECKPOINT}": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    assert snapshot["images"] == [image["uri"] for image in changed.result.images]
    assert snapshot["prompt"]["2"]["inputs"]["text"] == text


def test_prompt_embedding_is_recorded_with_its_sha256(runs: Runner, demo_models: Path):
    """``embedding:name`` in a prompt is a model file like a checkpoint: its hash goes into the group manifest."""
    run = runs(ROOT / "example_workflows" / "txt2img.json", params={"prompt": "a photo embedding:demo-embedding"})
    embedding = demo_models / "embeddings" / "demo-embedding.safetensors"
    sha = hashlib.sha256(embedding.read_bytes()).hexdigest()
    assert run.result.manifests["inference"]["models"]["embeddings/demo-embedding.safetensors"] == sha
    assert "embeddings/demo-embedding.safetensors" not in run.result.manifests["postprocess"]["models"]


@pytest.mark.parametrize("workflow", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_png_text_chunks(runs: Runner, workflow: Path):
    run = runs(workflow)
    api_nodes = {nid for group in run.compiled.groups for nid in group["spec"]["nodes"]}
    for path in run.image_paths().values():
        chunks = _png_text(path)
        prompt = json.loads(chunks["prompt"])
        assert set(prompt) == api_nodes
        if _is_ui_format(workflow):
            assert set(chunks) == {"prompt", "workflow"}
            assert json.loads(chunks["workflow"])["nodes"]
        else:
            assert set(chunks) == {"prompt"}
    assert list(run.output_folder(runs.store).glob("snapshot.*.json"))


# --- the nodes -----------------------------------------------------------------------------------------------


def test_registry_agrees_with_declarations():
    assert check_registry() == []
    assert len(CORE_NODES) == 34


def test_all_nodes_workflow_computes_what_its_nodes_promise(runs: Runner):
    run = runs(ALL_NODES)
    pixels = run.pixels()
    # ImageBatch of the input and its ImageInvert (PNG quantization: one step at most).
    original, inverted = pixels[("35", 0)].astype(int), pixels[("35", 1)].astype(int)
    source = np.asarray(Image.open(runs.inputs / "demo-input.png").convert("RGB")).astype(int)
    assert np.abs(original - source).max() <= 1
    assert np.abs(inverted - (255 - source)).max() <= 1
    # ImagePadForOutpaint (16 px left and right: 96×64), then ImageScaleToTotalPixels to 0.01 megapixels
    # (ComfyUI's megapixel is 1024 × 1024 pixels).
    scale = (0.01 * 1024 * 1024 / (96 * 64)) ** 0.5
    assert pixels[("36", 0)].shape == (round(64 * scale), round(96 * scale), 3)
    # RepeatLatentBatch(2) of one latent, two KSamplerAdvanced passes, LatentUpscale to 96×64, VAELoader's VAE.
    assert [pixels[("34", i)].shape for i in range(2)] == [(64, 96, 3)] * 2
    assert ("34", 2) not in pixels


def test_every_declared_node_runs(runs: Runner):
    for workflow in WORKFLOWS:
        runs(workflow)
    declared = {spec.class_type for spec in CORE_NODES}
    assert runs.executed == declared, f"never ran: {sorted(declared - runs.executed)}"


# --- what each group loads -----------------------------------------------------------------------------------

_LOADED = re.compile(r"node (\S+) \(CheckpointLoaderSimple\): loaded (\S+) \((\w+); ([A-Z, ]+); (\d+)/(\d+) tensors read\)")


def test_decode_only_group_reads_only_the_vae_tensors(runs: Runner, demo_models: Path,
                                                     caplog: pytest.LogCaptureFixture):
    from safetensors import safe_open

    with safe_open(str(demo_models / "checkpoints" / CHECKPOINT), framework="pt") as handle:
        keys = list(handle.keys())
    vae_keys = [k for k in keys if k.startswith("first_stage_model.")]
    assert 0 < len(vae_keys) < len(keys)

    clear_cache()  # the in-process model cache would otherwise serve the loads (0 tensors read)
    caplog.set_level(logging.INFO, logger="airflow_comfy.runner")
    run = runs(ROOT / "example_workflows" / "txt2img.json", reuse=False)
    assert [g["task_id"] for g in run.compiled.groups] == ["inference", "postprocess"]
    assert run.compiled.groups[1]["spec"]["components"] == {"1": ["VAE"]}

    loads: dict[str, tuple[str, int, int]] = {}
    group = None
    for record in caplog.records:
        message = record.getMessage()
        started = re.match(r"group (\S+) of ", message)
        if started:
            group = started.group(1)
        loaded = _LOADED.search(message)
        if loaded:
            assert loaded.group(2) == CHECKPOINT
            loads[group] = (loaded.group(4), int(loaded.group(5)), int(loaded.group(6)))
    assert loads == {
        "inference": ("CLIP, MODEL", len(keys) - len(vae_keys), len(keys)),
        "postprocess": ("VAE", len(vae_keys), len(keys)),
    }
    sha = hashlib.sha256((demo_models / "checkpoints" / CHECKPOINT).read_bytes()).hexdigest()
    assert run.result.manifests["postprocess"]["models"] == {f"checkpoints/{CHECKPOINT}": sha}
    _assert_same_pixels(run.pixels(), runs(run.workflow).pixels())


# --- the real command line -----------------------------------------------------------------------------------


def test_airflow_comfy_run_through_runner_subprocesses(runs: Runner, demo_models: Path, demo_inputs: Path,
                                                      tmp_path: Path):
    workflow = ROOT / "example_workflows" / "txt2img.json"
    env = dict(os.environ, COMFY_RUNNER_THREADS="1")
    command = [str(Path(sys.executable).with_name("airflow-comfy")), "run", str(workflow),
               "--models", str(demo_models), "--input-dir", str(demo_inputs), "--output", str(tmp_path / "out"),
               "--run-id", "cli", "--param", "steps=8"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = [line[len("output: "):] for line in proc.stdout.splitlines() if line.startswith("output: ")]
    assert len(outputs) == 1
    path = Path(outputs[0])
    assert path.is_file() and path.parent == tmp_path / "out" / "runs" / "txt2img" / "cli" / "outputs"
    assert path.name == "txt2img_00001_.png"
    assert set(_png_text(path)) == {"prompt", "workflow"}
    assert (path.parent / "snapshot.postprocess.json").is_file()
    for group in ("inference", "postprocess"):
        assert (tmp_path / "out" / "runs" / "txt2img" / "cli" / group / "try-1" / "manifest.json").is_file()
    # The same bits as the in-process run (and so as the single-group run).
    assert np.array_equal(_decode(path), runs(workflow).pixels()[("7", 0)])
