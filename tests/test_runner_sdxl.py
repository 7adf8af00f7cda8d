"""End to end on the SDXL path: ``tests/data/sdxl_txt2img.json`` runs on the tiny SDXL demo checkpoint
(``demo-sdxl-tiny.safetensors``: CLIP-L 32 + OpenCLIP-bigG 64 wide, bigG projection 48) through the runner,
sliced, one task per node and as one group, with bit-identical pixels (threads pinned with ``--threads 1``).

Also checks the SDXL specifics along the way: the CONDITIONING between tasks is the two encoders' hidden states
concatenated (width 96) with bigG's projected pooled output (width 48), the UNet gets them as ``text_embeds``
with SDXL's six ``time_ids``, and the sampler scales latents by SDXL's 0.13025.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from airflow_comfy.artifacts.store import file_uri_path
from airflow_comfy.local_run import LocalRunResult, compile_for_run, run_workflow
from airflow_comfy.runner.codecs import decode_value
from airflow_comfy.runner.context import RunContext
from airflow_comfy.runner.models import demo, load_checkpoint
from airflow_comfy.runner.models.families import detect_family
from airflow_comfy.runner.models.files import TensorReader
from airflow_comfy.workflow.catalog import Catalog

cfg_module = importlib.import_module("airflow_comfy.runner.sampling.cfg")
ksampler_module = importlib.import_module("airflow_comfy.runner.sampling.ksampler")

WORKFLOW = Path(__file__).resolve().parent / "data" / "sdxl_txt2img.json"
CHECKPOINT = demo.DEMO_SDXL_CHECKPOINT
THREADS = ["--threads", "1"]
CLIP_L_WIDTH = 32
CLIP_G_WIDTH = demo.TINY_SDXL_CLIP_G_WIDTH
POOLED_WIDTH = demo.TINY_SDXL_POOLED_WIDTH
# the nodes that compute a value (the checkpoint loader only makes recipes, loaded where they are used)
COMPUTED_NODES = [nid for nid, node in json.loads(WORKFLOW.read_text(encoding="utf-8")).items()
                  if not Catalog.builtin().get(node["class_type"]).produces_only_unserializable]


class _Runs:
    def __init__(self, models: Path, inputs: Path, store: Path, sidecar_dir: Path):
        self.models, self.inputs, self.store, self.sidecar_dir = models, inputs, store, sidecar_dir
        self.count = 0

    def __call__(self, *, single_group: bool = False, fine: bool = False) -> tuple[object, LocalRunResult]:
        sidecar = None
        if fine:  # every node a task of its own: every value between nodes crosses the artifact store
            sidecar = self.sidecar_dir / "fine.comfy.yaml"
            sidecar.write_text(json.dumps({"groups": {f"node_{n}": [n] for n in COMPUTED_NODES}}), encoding="utf-8")
        self.count += 1
        compiled = compile_for_run(WORKFLOW, single_group=single_group, sidecar=sidecar)
        result = run_workflow(compiled, models=self.models, input_dir=self.inputs, store=self.store.as_uri(),
                              run_id=f"sdxl-{self.count}", extra_args=THREADS, in_process=True,
                              echo=lambda _line: None)
        return compiled, result


@pytest.fixture(scope="module")
def runs(demo_models: Path, demo_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(demo_models, demo_inputs, tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("sidecar"))


@pytest.fixture(scope="module")
def sliced(runs: _Runs):
    return runs()


@pytest.fixture(scope="module")
def single(runs: _Runs):
    return runs(single_group=True)


@pytest.fixture(scope="module")
def fine(runs: _Runs):
    return runs(fine=True)


def _pixels(result: LocalRunResult) -> dict[str, np.ndarray]:
    out = {}
    for image in result.images:
        with Image.open(file_uri_path(image["uri"])) as png:
            out[image["node"]] = np.asarray(png.convert("RGB")).copy()
    return out


def _output(result: LocalRunResult, node: str, type_name: str):
    for manifest in result.manifests.values():
        for record in manifest["outputs"]:
            if record["node"] == node and record["type"] == type_name:
                data = Path(file_uri_path(record["uri"])).read_bytes()
                return record, decode_value(type_name, data, uri=record["uri"], sha256=record["sha256"])
    raise AssertionError(f"no {type_name} output of node {node} in the manifests")


def test_demo_sdxl_checkpoint_is_sdxl(demo_models: Path):
    path = demo_models / "checkpoints" / CHECKPOINT
    assert path.stat().st_size < 10_000_000
    with TensorReader(path) as reader:
        keys = reader.keys
        assert detect_family(keys) == "sdxl"
        assert any(k.startswith("conditioner.embedders.0.transformer.") for k in keys)
        assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
        assert "conditioner.embedders.1.model.text_projection" in keys
    tokenizers = demo_models / "tokenizers" / Path(CHECKPOINT).stem
    assert sorted(p.name for p in tokenizers.iterdir()) == sorted(demo.demo_tokenizer_files())


def test_sdxl_checkpoint_loads_on_a_run_context(demo_models: Path, demo_inputs: Path):
    context = RunContext(models_root=demo_models, input_dir=demo_inputs, device=torch.device("cpu"),
                         dtype=torch.float32)
    loaded = load_checkpoint(context, CHECKPOINT)
    assert loaded.family == "sdxl"
    assert loaded.model.family == "sdxl" and loaded.model.latent_scale == pytest.approx(0.13025)
    assert loaded.vae.latent_scale == pytest.approx(0.13025)
    assert loaded.model.prediction == "eps"
    config = loaded.model.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.cross_attention_dim == CLIP_L_WIDTH + CLIP_G_WIDTH
    assert len(loaded.clip.models) == 2 and len(loaded.clip.tokenizers) == 2
    assert loaded.clip.tokenizers[1].pad_token == "!"
    assert f"checkpoints/{CHECKPOINT}" in context.model_files


def test_sliced_single_group_and_one_task_per_node_give_identical_pixels(sliced, single, fine):
    (sliced_compiled, sliced_result), (single_compiled, single_result), (fine_compiled, fine_result) = \
        sliced, single, fine
    assert len(sliced_compiled.groups) > 1
    assert len(single_compiled.groups) == 1
    assert len(fine_compiled.groups) == len(COMPUTED_NODES)
    for result in (sliced_result, single_result, fine_result):
        assert {f"checkpoints/{CHECKPOINT}"} <= {m for manifest in result.manifests.values()
                                                   for m in manifest["models"]}
    a, b, c = _pixels(sliced_result), _pixels(single_result), _pixels(fine_result)
    assert a.keys() == b.keys() == c.keys() == {"7"}
    assert a["7"].shape == (64, 64, 3)
    assert np.array_equal(a["7"], b["7"]) and np.array_equal(a["7"], c["7"])
    assert len(np.unique(a["7"])) > 1, "the image is one flat colour"


def test_conditioning_is_sdxl_shaped(fine):
    _, result = fine
    for node in ("2", "3"):
        record, conditioning = _output(result, node, "CONDITIONING")
        assert len(conditioning) == 1
        entry = conditioning[0]
        # CLIP-L's and bigG's penultimate hidden states, concatenated on the feature axis
        assert tuple(entry.cond.shape) == (1, 77, CLIP_L_WIDTH + CLIP_G_WIDTH)
        # bigG's text_projection of its EOS hidden state
        assert entry.pooled_output is not None
        assert tuple(entry.pooled_output.shape) == (1, POOLED_WIDTH)
        assert torch.isfinite(entry.cond).all() and torch.isfinite(entry.pooled_output).all()
    _, latent = _output(result, "5", "LATENT")
    assert tuple(latent.samples.shape) == (1, 4, 8, 8)


def test_sampler_uses_sdxl_latent_scale_and_added_conds(runs: _Runs, single, monkeypatch):
    scales: list[float] = []
    added: list[tuple[torch.Tensor, torch.Tensor]] = []
    from_model, added_conds = ksampler_module.latent_from_model, cfg_module.CFGDenoiser._added_conds

    def spy_scale(samples, latent_scale):
        scales.append(latent_scale)
        return from_model(samples, latent_scale)

    def spy_added(self, entry, kind, x):
        out = added_conds(self, entry, kind, x)
        added.append(out)
        return out

    monkeypatch.setattr(ksampler_module, "latent_from_model", spy_scale)
    monkeypatch.setattr(cfg_module.CFGDenoiser, "_added_conds", spy_added)
    _, result = runs(single_group=True)
    assert scales and all(s == pytest.approx(0.13025) for s in scales)
    assert added
    for text_embeds, time_ids in added:
        assert tuple(text_embeds.shape) == (1, POOLED_WIDTH)
        assert time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    # the spies changed nothing
    assert np.array_equal(_pixels(result)["7"], _pixels(single[1])["7"])
