"""End to end on SD 2.x: the three official ComfyUI templates that use only our node types and SD 2.x checkpoints
(``embedding_example``: the 768-v model; ``inpaint_example`` and ``inpaint_model_outpainting``: the 512 inpainting
model) compile into their group specs and run through the runner, on tiny SD 2.x-shaped random-weight
checkpoints written under the templates' own file names (:func:`~airflow_comfy.runner.models.demo.make_sd2_demo_models`).
Sliced into the templates' groups and as one group, the pixels are identical (threads pinned with ``--threads 1``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from workflow_builders import TEMPLATES, data_file

from airflow_comfy.artifacts.store import file_uri_path
from airflow_comfy.local_run import LocalRunResult, compile_for_run, run_workflow
from airflow_comfy.runner.models import demo, load_checkpoint_file

THREADS = ["--threads", "1"]
V_MODEL = "v2-1_768-ema-pruned.safetensors"
INPAINT_MODEL = "512-inpainting-ema.safetensors"
CASES = {
    # template: (checkpoint, output image height × width)
    "embedding_example": (V_MODEL, (768, 768)),
    "inpaint_example": (INPAINT_MODEL, (512, 512)),  # input scaled to 0.25 megapixels
    "inpaint_model_outpainting": (INPAINT_MODEL, (512 + 40 + 128, 512 + 40 + 40)),  # then padded
}


@pytest.fixture(scope="module")
def sd2_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd2-models")
    demo.make_sd2_demo_models(root, checkpoint=V_MODEL, inpaint_checkpoint=INPAINT_MODEL)
    return root


@pytest.fixture(scope="module")
def sd2_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``input.png`` (RGBA: a transparent disc, LoadImage's mask) and ``example.png`` (RGB), 96×96."""
    root = tmp_path_factory.mktemp("sd2-input")
    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(root / "example.png")
    image = Image.fromarray(rgb, "RGB").convert("RGBA")
    alpha = Image.new("L", (96, 96), 255)
    ImageDraw.Draw(alpha).ellipse((24, 24, 71, 71), fill=0)
    image.putalpha(alpha)
    image.save(root / "input.png")
    return root


def _pixels(result: LocalRunResult) -> dict[str, np.ndarray]:
    out = {}
    for image in result.images:
        with Image.open(file_uri_path(image["uri"])) as png:
            out[image["node"]] = np.asarray(png.convert("RGB")).copy()
    return out


def test_the_demo_checkpoints_are_what_the_templates_need(sd2_models: Path):
    v = load_checkpoint_file(sd2_models / "checkpoints" / V_MODEL, {"MODEL"}, use_cache=False)
    inpaint = load_checkpoint_file(sd2_models / "checkpoints" / INPAINT_MODEL, {"MODEL"}, use_cache=False)
    assert (v.family, v.model.prediction, v.model.unet.config.in_channels) == ("sd2", "v", 4)
    assert (inpaint.family, inpaint.model.prediction, inpaint.model.unet.config.in_channels) == ("sd2", "eps", 9)


@pytest.mark.parametrize("template", sorted(CASES))
def test_sd2_template_runs_sliced_and_as_one_group(template: str, sd2_models: Path, sd2_inputs: Path,
                                                   tmp_path: Path):
    checkpoint, size = CASES[template]
    path = data_file(TEMPLATES / f"{template}.json")
    runs = {}
    for single in (False, True):
        compiled = compile_for_run(path, single_group=single)
        assert (len(compiled.groups) == 1) == single
        result = run_workflow(compiled, models=sd2_models, input_dir=sd2_inputs, store=tmp_path.as_uri(),
                              run_id=f"{template}-{'single' if single else 'sliced'}", extra_args=THREADS,
                              in_process=True, echo=lambda _line: None)
        assert {f"checkpoints/{checkpoint}"} <= {m for manifest in result.manifests.values()
                                                  for m in manifest["models"]}
        runs[single] = _pixels(result)
    sliced, single = runs[False], runs[True]
    assert sliced.keys() == single.keys() == {"9"}
    assert sliced["9"].shape == (*size, 3)
    assert np.array_equal(sliced["9"], single["9"])
    assert len(np.unique(sliced["9"])) > 1, "the image is one flat colour"
