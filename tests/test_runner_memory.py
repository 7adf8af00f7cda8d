"""Running out of memory: a node that does is retried once in low-memory mode (tiled VAE, sliced attention),
recorded in the manifest and the run snapshot; a second time fails the group as an infrastructure failure
(exit code 1) naming node and class. On CPU the memory budget (``--memory-budget-mb``,
``COMFY_RUNNER_MEMORY_BUDGET_MB``) raises the error torch raises on a GPU.

Budgets on the demo models (txt2img: 64 × 64 pixels, an 8 × 8 latent, float32):

* KSampler: the UNet's largest attention score matrix is [2, 8, 64, 64] = 0.25 MiB; sliced, one head 16 KiB.
* VAEDecode: the decoder's largest activation is [1, 32, 64, 64] = 0.5 MiB; in 56-pixel tiles 0.38 MiB, in the
  smallest (32-pixel) tiles 0.125 MiB.

So 0.4 MiB retries only the decode (in four 56-pixel tiles), 0.2 MiB the sampler too, 0.05 MiB lets the
sliced sampler through but no decode, and 0.01 MiB fits no sampler.

Tolerances: the demo VAE has random weights, 32 channels and a receptive field as wide as a tile, which makes it
far more sensitive to tiling than a trained VAE. Measured (this file's runs, CPU, one thread): 56-pixel tiles
of the 64-pixel txt2img image differ from the whole decode by at most 23 and on average 2.9 levels of 255;
with the sampler sliced too and 40-pixel tiles, at most 60 and on average 7.8.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from airflow_comfy.artifacts.manifest import GroupManifest
from airflow_comfy.artifacts.specs import publish_spec
from airflow_comfy.artifacts.store import file_uri_path, open_store
from airflow_comfy.local_run import GroupFailed, compile_for_run, run_workflow
from airflow_comfy.log_lines import parse_line
from airflow_comfy.operators.command import local_arguments, runner_arguments, runner_prefix
from airflow_comfy.runner import memory, registry
from airflow_comfy.runner.context import NodeContext, RunContext
from airflow_comfy.runner.models import load_checkpoint
from airflow_comfy.runner.models.config import shipped_config
from airflow_comfy.runner.ops import vae as vae_ops
from airflow_comfy.workflow.groupspec import GroupSpec

ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = ROOT / "example_workflows" / "txt2img.json"
IMG2IMG = ROOT / "example_workflows" / "img2img.json"
THREADS = ["--threads", "1"]
MiB = 2**20
# measured maxima (see the module docstring) with some headroom for other CPUs' arithmetic
TILED_MAX, TILED_MEAN = 32, 4.0
BOTH_MAX, BOTH_MEAN = 80, 10.0


# --- tiles and estimates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "tile", "overlap"), [(8, 4, 1), (8, 7, 1), (64, 32, 8), (100, 64, 16),
                                                        (128, 64, 16), (5, 8, 2), (9, 4, 3)])
def test_tiles_cover_the_axis_at_full_size_and_overlap(size: int, tile: int, overlap: int):
    starts = vae_ops.tile_starts(size, tile, overlap)
    assert starts[0] == 0
    if size <= tile:
        assert starts == [0]
        return
    assert starts[-1] + tile == size  # every tile has the full size, the last one ends at the edge
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))  # overlap >= asked
    assert starts == sorted(set(starts))


@pytest.fixture(scope="module")
def demo_vae(demo_models: Path):
    ctx = RunContext(models_root=demo_models, input_dir=demo_models, device=torch.device("cpu"),
                     dtype=torch.float32)
    return load_checkpoint(ctx, "demo-sd15-tiny.safetensors", ["VAE"]).outputs()[2].vae


def _levels(image: torch.Tensor) -> torch.Tensor:
    return ((image.float() + 1) / 2).clamp(0, 1) * 255


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_tile_is_the_whole_computation(demo_vae, one_thread):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8) * 50
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        for item in range(2):  # low-memory mode also takes one batch item at a time
            one = slice(item, item + 1)
            assert torch.equal(vae_ops.decode_tiled(demo_vae, latents[one], 8, 2),
                               vae_ops.decode(demo_vae, latents[one]))
            assert torch.equal(vae_ops.encode_tiled(demo_vae, pixels[one], 8, 2),
                               vae_ops.encode(demo_vae, pixels[one]))
        torch.testing.assert_close(vae_ops.decode_tiled(demo_vae, latents, 8, 2), vae_ops.decode(demo_vae, latents))


def test_tiled_vae_is_close_to_the_whole(demo_vae, one_thread):
    """256 × 256 pixels in 192-pixel tiles (2 × 2): measured 7.4 levels at most, 0.9 on average (decode) and
    latents 0.19 at most, 0.017 on average (their std 0.24) (encode)."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 50
    with torch.inference_mode():
        whole = vae_ops.decode(demo_vae, latents)
        tiled = vae_ops.decode_tiled(demo_vae, latents, 24, 6)
        assert tiled.shape == whole.shape
        difference = (_levels(tiled) - _levels(whole)).abs()
        assert difference.max() < 12 and difference.mean() < 1.5
        image = whole.clamp(-1, 1)
        encoded = vae_ops.encode(demo_vae, image)
        encoded_tiled = vae_ops.encode_tiled(demo_vae, image, 24, 6)
        assert encoded_tiled.shape == encoded.shape
        assert (encoded_tiled - encoded).abs().mean() < 0.03 and (encoded_tiled - encoded).abs().max() < 0.3


def test_estimates_of_the_sd15_vae():
    """Of the real SD 1.x VAE (built on the meta device: shapes only)."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in shipped_config("sd1", "vae").items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    decode = vae_ops.decode_estimate(vae, (1, 4, 64, 64), torch.float32)
    assert decode.nbytes == 256 * 512 * 512 * 4  # 256 MiB: the third up block's output, upsampled to 512 px
    assert decode.what == "decoder activation [1, 256, 512, 512] float32"
    encode = vae_ops.encode_estimate(vae, (1, 3, 512, 512), torch.float16)
    assert encode.nbytes == 128 * 512 * 512 * 2 and encode.what == "encoder activation [1, 128, 512, 512] float16"
    # 1536 px: the mid block's attention over 192 × 192 tokens outgrows every activation
    attention = vae_ops.decode_estimate(vae, (1, 4, 192, 192), torch.float16)
    assert attention.what == "decoder mid-block attention scores [1, 1, 36864, 36864] float32"
    # A budget picks the largest tile that fits; without one the tile is halved until there are tiles.
    tiling = vae_ops.choose_tiling(lambda t: vae_ops.decode_estimate(vae, (1, 4, t, t), torch.float32),
                                   64, 64, 100 * MiB)
    assert tiling is not None and (tiling.tile, tiling.overlap, tiling.tiles) == (40, 10, 4)
    assert tiling.estimate.nbytes == 100 * MiB  # [1, 256, 320, 320] float32: exactly the budget
    assert vae_ops.decode_estimate(vae, (1, 4, 41, 41), torch.float32).nbytes > 100 * MiB
    default = vae_ops.choose_tiling(lambda t: vae_ops.decode_estimate(vae, (1, 4, t, t), torch.float32),
                                    128, 96, None)
    assert (default.tile, default.overlap, default.tiles) == (64, 16, 6)
    assert vae_ops.choose_tiling(lambda t: vae_ops.decode_estimate(vae, (1, 4, t, t), torch.float32),
                                 64, 64, MiB - 1) is None  # 32-pixel tiles need 1 MiB


def test_what_counts_as_out_of_memory():
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert memory.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert memory.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 8589934592 bytes"))
    assert not memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not memory.is_out_of_memory(ValueError("out of memory"))


def test_guarded_attention(demo_models: Path):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    block = Attention(query_dim=16, heads=4, dim_head=8, cross_attention_dim=12)
    x, context = torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    own = block.processor
    expected = block(x, encoder_hidden_states=context)
    run = RunContext(models_root=demo_models, input_dir=demo_models, device=torch.device("cpu"),
                     dtype=torch.float32)
    ctx = NodeContext(run, "5", "KSampler")
    with memory.guarded_attention(ctx, ("UNet", block)):  # no budget: nothing is installed
        assert block.processor is own
    scores = 2 * 4 * 10 * 7 * 4  # batch × heads × queries × keys × float32
    run.memory_budget = scores
    with memory.guarded_attention(ctx, ("UNet", block)):
        assert block.processor is not own
        assert torch.equal(block(x, encoder_hidden_states=context), expected)  # checked, same computation
    run.memory_budget = scores - 1
    with pytest.raises(torch.OutOfMemoryError, match=r"UNet attention scores \[2, 4, 10, 7\] needs"), \
            memory.guarded_attention(ctx, ("UNet", block)):
        block(x, encoder_hidden_states=context)
    assert block.processor is own
    low = NodeContext(run, "5", "KSampler", low_memory=True)
    run.memory_budget = 3 * 10 * 7 * 4  # three heads' scores at a time
    with memory.guarded_attention(low, ("UNet", block)):
        torch.testing.assert_close(block(x, encoder_hidden_states=context), expected)
    assert low.low_memory_report == {"attention_slice": 3}
    run.memory_budget = 10 * 7 * 4 - 1
    with pytest.raises(torch.OutOfMemoryError, match="one head"), memory.guarded_attention(low, ("UNet", block)):
        block(x, encoder_hidden_states=context)
    assert block.processor is own


# --- whole runs ---------------------------------------------------------------------------------------------------


def _run(workflow: Path, models: Path, inputs: Path, store: Path, run_id: str, budget: float | None):
    extra = THREADS + ([] if budget is None else ["--memory-budget-mb", str(budget)])
    return run_workflow(compile_for_run(workflow), models=models, input_dir=inputs, store=store.as_uri(),
                        run_id=run_id, extra_args=extra, in_process=True, echo=lambda _line: None)


def _pixels(result) -> np.ndarray:
    (image,) = result.images
    with Image.open(file_uri_path(image["uri"])) as png:
        return np.asarray(png.convert("RGB")).astype(int)


def _snapshot(result, group: str) -> dict:
    (image,) = result.images
    path = Path(file_uri_path(image["uri"])).parent / f"snapshot.{group}.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def normal(demo_models: Path, demo_inputs: Path, store: Path):
    return _run(TXT2IMG, demo_models, demo_inputs, store, "normal", None)


def test_a_budget_that_fits_changes_nothing(normal, demo_models: Path, demo_inputs: Path, store: Path):
    roomy = _run(TXT2IMG, demo_models, demo_inputs, store, "roomy", 1000)
    assert np.array_equal(_pixels(roomy), _pixels(normal))
    assert all(m["low_memory"] == {} for m in roomy.manifests.values())
    assert _snapshot(roomy, "postprocess")["low_memory"] == {}


def test_decode_over_the_budget_is_retried_in_tiles(normal, demo_models: Path, demo_inputs: Path, store: Path,
                                                  caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="airflow_comfy.runner")
    result = _run(TXT2IMG, demo_models, demo_inputs, store, "tiled", 0.4)
    log = "\n".join(record.getMessage() for record in caplog.records)
    assert re.search(r"node 6 \(VAEDecode\): out of memory \(OutOfMemoryError: out of memory \(memory budget\): "
                     r"VAE decode: decoder activation \[1, 32, 64, 64\] float32 needs 0\.50 MiB, over the budget "
                     r"of 0\.40 MiB .*\); memory freed, retrying once in low-memory mode", log)
    assert "node 6 (VAEDecode): low-memory mode: VAE decode in 4 tile(s) of 56×56 px, overlap 8 px" in log
    assert re.search(r"node 6 \(VAEDecode\): done in [\d.]+s \(low-memory mode\)", log)
    assert "memory budget 0.4 MiB" in log
    assert "KSampler): out of memory" not in log

    entry = {"group": "postprocess", "class_type": "VAEDecode", "vae": "decode in tiles", "tile_px": 56,
             "overlap_px": 8, "tiles": 4, "largest_allocation_bytes": 32 * 56 * 56 * 4}
    low_memory = result.manifests["postprocess"]["low_memory"]
    assert set(low_memory) == {"6"} and low_memory["6"].items() >= entry.items()
    assert "over the budget of 0.40 MiB" in low_memory["6"]["error"]
    assert result.manifests["inference"]["low_memory"] == {}
    assert _snapshot(result, "postprocess")["low_memory"] == low_memory
    # the manifest reads back (a downstream group reads it)
    assert GroupManifest.from_dict(result.manifests["postprocess"]).low_memory == low_memory

    # the sampler ran as always: the same latent; the tiled decode is close to the whole one
    assert (Path(file_uri_path(result.manifests["inference"]["outputs"][0]["uri"])).read_bytes()
            == Path(file_uri_path(normal.manifests["inference"]["outputs"][0]["uri"])).read_bytes())
    difference = np.abs(_pixels(result) - _pixels(normal))
    assert 0 < difference.max() <= TILED_MAX and difference.mean() <= TILED_MEAN


def test_sampler_and_decode_over_the_budget(normal, demo_models: Path, demo_inputs: Path, store: Path):
    result = _run(TXT2IMG, demo_models, demo_inputs, store, "both", 0.2)
    inference = result.manifests["inference"]["low_memory"]
    assert set(inference) == {"5"}
    # 0.2 MiB holds ten of the sixteen (batch × heads) 64 × 64 score matrices
    assert inference["5"].items() >= {"group": "inference", "class_type": "KSampler", "attention_slice": 10}.items()
    assert "UNet attention scores [2, 8, 64, 64] needs 0.25 MiB" in inference["5"]["error"]
    # the decode group lists its own retry and the one upstream whose latent it decoded
    downstream = result.manifests["postprocess"]["low_memory"]
    assert set(downstream) == {"5", "6"} and downstream["5"] == inference["5"]
    assert downstream["6"]["tile_px"] == 40
    assert _snapshot(result, "postprocess")["low_memory"] == downstream
    difference = np.abs(_pixels(result) - _pixels(normal))
    assert difference.max() <= BOTH_MAX and difference.mean() <= BOTH_MEAN


def test_encode_over_the_budget_is_retried_in_tiles(demo_models: Path, demo_inputs: Path, store: Path):
    normal = _run(IMG2IMG, demo_models, demo_inputs, store, "img2img-normal", None)
    result = _run(IMG2IMG, demo_models, demo_inputs, store, "img2img-tiled", 0.4)
    retried = {node: entry for manifest in result.manifests.values()
               for node, entry in manifest["low_memory"].items()}
    assert {node: entry["class_type"] for node, entry in retried.items()} == {"12": "VAEEncode", "14": "VAEDecode"}
    assert retried["12"]["vae"] == "encode in tiles" and retried["12"]["tile_px"] == 56
    assert "VAE encode: encoder activation [1, 32, 64, 64] float32 needs 0.50 MiB" in retried["12"]["error"]
    difference = np.abs(_pixels(result) - _pixels(normal))
    assert difference.mean() <= BOTH_MEAN


@pytest.mark.parametrize(("budget", "node"), [(0.05, "6 (VAEDecode)"), (0.01, "5 (KSampler)")])
def test_out_of_memory_twice_is_an_infrastructure_failure(demo_models: Path, demo_inputs: Path, store: Path,
                                                         capsys: pytest.CaptureFixture, budget: float, node: str):
    capsys.readouterr()
    with pytest.raises(GroupFailed) as failed:
        _run(TXT2IMG, demo_models, demo_inputs, store, f"fails-{budget}", budget)
    assert failed.value.returncode == 1  # retryable
    last = parse_line(capsys.readouterr().err.strip().splitlines()[-1])[1]
    assert last.startswith(f"airflow-comfy runner: failed: NodeOutOfMemory: node {node} ran out of memory, and "
                           "again when retried in low-memory mode (tiled VAE, sliced attention): OutOfMemoryError: "
                           "out of memory (memory budget): "), last


def test_a_real_out_of_memory_error_is_retried_once(normal, demo_models: Path, demo_inputs: Path, store: Path,
                                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """What CUDA raises (no budget involved): freed, retried, recorded. Another error is not retried."""
    decode = registry.implementation("VAEDecode")
    calls: list[bool] = []

    def flaky(ctx: NodeContext, samples, vae):
        calls.append(ctx.low_memory)
        if not ctx.low_memory:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return decode(ctx, samples, vae)

    monkeypatch.setitem(registry._IMPLEMENTATIONS, "VAEDecode", flaky)
    freed: list[torch.device] = []
    monkeypatch.setattr("airflow_comfy.runner.executor.free_memory", freed.append)
    result = _run(TXT2IMG, demo_models, demo_inputs, store, "cuda-like", None)
    assert calls == [False, True] and freed == [torch.device("cpu")]
    entry = result.manifests["postprocess"]["low_memory"]["6"]
    assert entry["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    # no budget: the tiles are the default's (halved until there are tiles: 32 px on this 64-pixel image)
    assert (entry["tile_px"], entry["overlap_px"], entry["tiles"]) == (32, 8, 9)
    assert np.abs(_pixels(result) - _pixels(normal)).mean() <= 2 * BOTH_MEAN

    def broken(ctx: NodeContext, samples, vae):
        calls.append(ctx.low_memory)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    calls.clear()
    monkeypatch.setitem(registry._IMPLEMENTATIONS, "VAEDecode", broken)
    with pytest.raises(GroupFailed) as failed:
        _run(TXT2IMG, demo_models, demo_inputs, store, "broken", None)
    assert failed.value.returncode == 1 and calls == [False]
    assert "low-memory" not in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "lots", "inf"])
def test_budget_must_be_a_positive_number(value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from airflow_comfy.runner.cli import main

    argv = ["run", "--spec", "data:,", "--store", tmp_path.as_uri(), "--run-key", "d/r", "--models",
            str(tmp_path), "--input-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--memory-budget-mb", value])
    assert exited.value.code == 2
    monkeypatch.setenv("COMFY_RUNNER_MEMORY_BUDGET_MB", value)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


# --- through a real process ---------------------------------------------------------------------------------------


def test_runner_process_retries_and_fails_by_budget(demo_models: Path, demo_inputs: Path, tmp_path: Path):
    """``python -m airflow_comfy.runner`` with the budget from the environment (retried, exit 0) and from the
    command line (out of memory twice, exit 1)."""
    spec = GroupSpec.from_dict(compile_for_run(TXT2IMG, single_group=True).groups[0]["spec"])
    store = open_store(tmp_path / "store")
    manifest = tmp_path / "manifest.json"

    def run(run_key: str, env: dict[str, str], extra: list[str]) -> subprocess.CompletedProcess:
        argv = runner_arguments(spec, store=store.root_uri, models_path=str(demo_models),
                                input_path=str(demo_inputs), run_key=run_key, try_number="1", params="{}",
                                input_uris=[])
        argv[argv.index("--spec") + 1] = publish_spec(store, spec.to_bytes(), spec.sha256())
        command = runner_prefix(sys.executable) + local_arguments(argv, str(manifest)) + THREADS + extra
        return subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in os.environ.items() if k != "COMFY_RUNNER_MEMORY_BUDGET_MB"}
                              | env)

    proc = run("txt2img/budget-env", {"COMFY_RUNNER_MEMORY_BUDGET_MB": "0.4"}, [])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "node 6 (VAEDecode): out of memory" in proc.stdout and "retrying once in low-memory mode" in proc.stdout
    written = json.loads(manifest.read_text(encoding="utf-8"))
    assert written["low_memory"]["6"]["class_type"] == "VAEDecode" and written["low_memory"]["6"]["tiles"] == 4
    manifest.unlink()

    proc = run("txt2img/budget-flag", {}, ["--memory-budget-mb", "0.05"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("airflow-comfy runner: failed: NodeOutOfMemory: node 6 (VAEDecode) ran out of memory, and again when "
            "retried in low-memory mode") in proc.stderr.strip().splitlines()[-1]
    assert not manifest.exists()


def test_no_leftover_processors(demo_models: Path):
    """The guarded processors never stay on the cached models."""
    from diffusers.models.attention_processor import Attention

    ctx = RunContext(models_root=demo_models, input_dir=demo_models, device=torch.device("cpu"),
                     dtype=torch.float32)
    unet = load_checkpoint(ctx, "demo-sd15-tiny.safetensors", ["MODEL"]).outputs()[0].unet
    kinds = {type(m.processor).__name__ for m in unet.modules() if isinstance(m, Attention)}
    assert kinds == {"AttnProcessor2_0"}

