"""The factory: a folder of ComfyUI workflows becomes DAGs, through real Airflow parsing.

What a user sees: the loader stub in the dags folder turns every good workflow into a DAG (tasks wired by the
group graph, trigger params with bounds), every bad one into a line of the stub's import error that names the
file (and node, class type, input) without hiding the others; sidecars shape the DAG and its tasks; unchanged
files come from the parse cache; the Airflow side never imports torch; Airflow knows the provider.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import ParamValidationError
from workflow_builders import EXAMPLES, REPO, TEMPLATES, TXT2IMG, txt2img

from airflow_comfy.config import get_settings
from airflow_comfy.factory.cache import clear_memory
from airflow_comfy.operators.local import ComfyGroupLocalOperator
from airflow_comfy.operators.pod import ComfyGroupPodOperator

pytestmark = pytest.mark.airflow

STUB = REPO / "dags" / "comfy_workflows.py"
ERROR_STUB = REPO / "dags" / "comfy_workflow_errors.py"
SENTINEL = "airflow_comfy.ComfyWorkflowImportError: "
TEMPLATE_FILES = sorted(p for p in TEMPLATES.glob("*.json") if not p.name.startswith("index"))
GOOD_DAGS = {
    "2_pass_pose_worship", "area_composition", "area_composition_square_area_for_subject", "controlnet_example",
    "default", "depth_controlnet", "depth_t2i_adapter", "embedding_example", "esrgan_example",
    "hiresfix_esrgan_workflow", "hiresfix_latent_workflow", "image2image", "inpaint_example",
    "inpaint_model_outpainting", "latent_upscale_different_prompt_model", "lora", "lora_multiple",
    "mixing_controlnets", "sdxl_refiner_prompt_example", "sdxl_simple_example",
}
BAD_TEMPLATES = {p.name for p in TEMPLATE_FILES} - {f"{d}.json" for d in GOOD_DAGS}
DEFAULT_TEXT = (TEMPLATES / "default.json").read_text(encoding="utf-8")
NODE_TYPE_LISTING = re.compile(r"[A-Za-z0-9_]+ \(nodes? [0-9:]+(, [0-9:]+)*\)")


# --- helpers ------------------------------------------------------------------------------------------------


def dags_folder(folder: Path, files: dict[str, str | dict | list]) -> Path:
    """A dags folder holding the two loader stubs and ``files`` (text, or JSON documents)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(STUB, folder / STUB.name)
    shutil.copy(ERROR_STUB, folder / ERROR_STUB.name)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def parse(folder: Path) -> DagBag:
    """What the dag-processor does with the folder (the warnings it captures per file stay in the DagBag)."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return DagBag(dag_folder=str(folder))


def loader_error(bag: DagBag, folder: Path) -> str:
    """The error stub's import error, after checking it is the only one: the building stub never has one."""
    assert list(bag.import_errors) == [str(folder / ERROR_STUB.name)], bag.import_errors
    (text,) = bag.import_errors.values()
    assert SENTINEL in text, text[:2000]
    return text.partition(SENTINEL)[2]


def error_blocks(text: str, folder: Path) -> dict[str, str]:
    """``{file name: its message}`` from the loader's import error (one block per bad file)."""
    header, *blocks = re.split(rf"\n\n{re.escape(str(folder))}/", text)
    assert "could not become DAGs (the other workflows loaded):" in header
    return dict(block.partition(": ")[::2] for block in blocks)


def upstream(dag) -> dict[str, set[str]]:
    return {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}


def template_node(name: str, node_id: int) -> dict:
    doc = json.loads((TEMPLATES / name).read_text(encoding="utf-8"))
    return next(n for n in doc["nodes"] if n["id"] == node_id)


# --- 1. the 172 real templates ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = dags_folder(tmp_path_factory.mktemp("templates") / "dags", {})
    for path in TEMPLATE_FILES:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def templates_bag(templates_folder: Path) -> DagBag:
    return parse(templates_folder)


def test_templates_package_is_the_expected_one():
    assert len(TEMPLATE_FILES) == 172
    assert len(BAD_TEMPLATES) == 152


def test_templates_folder_loads_exactly_the_supported_workflows(templates_bag: DagBag):
    assert set(templates_bag.dags) == GOOD_DAGS
    for dag in templates_bag.dags.values():
        assert dag.fileloc.endswith(STUB.name)
        assert "comfyui" in dag.tags
        assert dag.tasks, dag.dag_id
        assert all(isinstance(t, ComfyGroupLocalOperator) for t in dag.tasks), dag.dag_id  # [comfy] backend local


def test_every_other_template_is_named_in_the_loader_import_error(templates_bag: DagBag, templates_folder: Path):
    blocks = error_blocks(loader_error(templates_bag, templates_folder), templates_folder)
    assert set(blocks) == BAD_TEMPLATES
    # "api_wan_text_to_image .json" and "api_wan_text_to_image.json" both make the dag id
    # "api_wan_text_to_image"; neither loads, so neither claims it and each reports its own problem.
    assert "WanTextToImageApi (node 12)" in blocks["api_wan_text_to_image.json"]
    assert "dag id" not in blocks["api_wan_text_to_image.json"]
    for name, message in blocks.items():
        assert "node types" in message and NODE_TYPE_LISTING.search(message), (name, message)
    flux = blocks["flux_dev_full_text_to_image.json"]
    assert "UNETLoader (node" in flux and "DualCLIPLoader (node" in flux
    assert "EmptySD3LatentImage (node 53)" in blocks["sd3.5_simple_example.json"]
    assert "OpenAIDalle3 (node 21)" in blocks["api_openai_dall_e_3_t2i.json"]
    assert "UNETLoader (nodes 76, 75)" in blocks["video_wan2_2_14B_t2v (2).json"]


def test_bad_templates_are_also_warnings_of_the_loader_file(templates_bag: DagBag, templates_folder: Path):
    captured = "\n".join(templates_bag.captured_warnings[str(templates_folder / STUB.name)])
    assert "ComfyWorkflowWarning" in captured
    for name in ("flux_dev_full_text_to_image.json", "sd3.5_simple_example.json", "api_wan_text_to_image.json"):
        assert f"{templates_folder}/{name}: " in captured


def test_tasks_follow_the_group_graph(templates_bag: DagBag):
    assert upstream(templates_bag.dags["default"]) == {"inference": set(), "postprocess": {"inference"}}
    # UI groups; parallel branches stay parallel.
    assert upstream(templates_bag.dags["sdxl_refiner_prompt_example"]) == {
        "empty_latent_image": set(),
        "base_prompt": set(),
        "base": {"base_prompt", "empty_latent_image"},
        "refiner_prompt": set(),
        "refiner": {"base", "refiner_prompt"},
        "vae_decoder": {"refiner"},
    }
    assert upstream(templates_bag.dags["area_composition"])["first_sampling_text2img"] == {
        "first_sampling_size", "step2_-_area_conditioning"}


def test_dag_documents_its_groups(templates_bag: DagBag):
    doc = templates_bag.dags["default"].doc_md
    assert "## Groups" in doc
    assert "| `inference` | 3 KSampler, 5 EmptyLatentImage, 6 CLIPTextEncode, 7 CLIPTextEncode |" in doc
    assert "| `postprocess` | 8 VAEDecode, 9 SaveImage |" in doc
    assert "| `inference` | `postprocess` | LATENT (node 3 output 0) |" in doc
    for task in templates_bag.dags["default"].tasks:
        assert f"ComfyUI group `{task.task_id}`" in task.doc_md


def test_dag_docs_draw_the_groups_and_name_the_workflow_file(tmp_path: Path):
    folder = dags_folder(tmp_path / "dags", {"img2img.json": (EXAMPLES / "img2img.json").read_text()})
    doc = parse(folder).dags["img2img"].doc_md
    diagram = doc[doc.index("```text\n") + 8:doc.index("\n```\n")].splitlines()
    # one box per group in task order, and what each hands to which node input of a later group
    assert [line.split()[1] for line in diagram if line.startswith("┌─ ")] == [
        "prompts", "load_and_encode_the_image", "sample", "decode_and_save"]
    assert "│ 10 LoadImage · 11 ImageScale · 12 VAEEncode" in diagram
    assert "│ replays 1 CheckpointLoaderSimple (VAE)" in diagram
    assert [line.strip() for line in diagram if "─▶" in line] == [
        "├─▶ sample: CONDITIONING 2 CLIPTextEncode → 13 KSampler.positive",
        "└─▶ sample: CONDITIONING 3 CLIPTextEncode → 13 KSampler.negative",
        "└─▶ sample: LATENT 12 VAEEncode → 13 KSampler.latent_image",
        "└─▶ decode_and_save: LATENT 13 KSampler → 14 VAEDecode.samples",
    ]
    assert (f"**Workflow file:** [img2img.json](/comfy/workflows/img2img) (`img2img.json`) in the workflows "
            f"folder (`{folder}`)") in doc
    assert "The *Code* tab shows the loader stub" in doc


def test_dag_docs_link_under_the_uis_base_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With the UI served under a path (``[api] base_url``), the docs' link to the workflow file starts with it,
    and the path the docs name is the one the gallery's route reads back."""
    from airflow_comfy.factory.docs import workflow_source_of

    folder = dags_folder(tmp_path / "dags", {"my [draft].json": (EXAMPLES / "img2img.json").read_text()})
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example/team/")
    doc = parse(folder).dags["my_draft"].doc_md
    assert "**Workflow file:** [my \\[draft\\].json](/team/comfy/workflows/my_draft) (`my [draft].json`)" in doc
    assert workflow_source_of(doc) == str(folder / "my [draft].json")


def test_trigger_params_have_types_bounds_and_the_workflows_defaults(templates_bag: DagBag):
    params = templates_bag.dags["default"].params
    assert set(params) == {"seed", "steps", "cfg", "denoise", "width", "height", "batch_size", "prompt",
                           "negative_prompt", "tier"}
    seed, _, steps, cfg, _, _, denoise = template_node("default.json", 3)["widgets_values"]
    (prompt,) = template_node("default.json", 6)["widgets_values"]
    expected = {  # name: (schema without title, default from the workflow, Python type)
        "seed": ({"type": "integer", "minimum": 0, "maximum": 2**64 - 1}, seed, int),
        "steps": ({"type": "integer", "minimum": 1, "maximum": 10000}, steps, int),
        "cfg": ({"type": "number", "minimum": 0.0, "maximum": 100.0}, cfg, float),
        "denoise": ({"type": "number", "minimum": 0.0, "maximum": 1.0}, denoise, float),
        "width": ({"type": "integer", "minimum": 16, "maximum": 16384}, 512, int),
        "prompt": ({"type": "string", "format": "multiline"}, prompt, str),
        "negative_prompt": ({"type": "string", "format": "multiline"}, "text, watermark", str),
    }
    for name, (schema, default, kind) in expected.items():
        param = params.get_param(name)
        assert {k: v for k, v in param.schema.items() if k != "title"} == schema, name
        assert param.value == default and type(param.value) is kind, name
    assert params.get_param("prompt").schema["title"] == "Prompt"
    # What the REST API / trigger form enforce with these schemas.
    assert params.get_param("steps").resolve(30) == 30
    for name, value in (("steps", 0), ("cfg", 1000.0), ("seed", -1), ("steps", "many")):
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(value)
    # every workflow DAG offers the run's tier as a dropdown (default: [comfy] default_tier without a sidecar)
    tier = params.get_param("tier")
    assert (tier.value, tier.schema["type"], tier.schema["enum"]) == ("normal", "string",
                                                                      ["vip", "high", "normal", "batch"])
    assert tier.resolve("vip") == "vip"
    with pytest.raises(ParamValidationError):
        tier.resolve("urgent")
    image = templates_bag.dags["image2image"].params.get_param("image")
    assert image.value == "example.png"
    assert image.resolve("cats/cat.png") == "cats/cat.png"
    for escape, sentence in (("../../etc/passwd", "'../../etc/passwd' leaves the input folder"),
                             ("/etc/passwd", "'/etc/passwd' is an absolute path"),
                             ("cat.gif", "'cat.gif' is not an image type the runner reads (png, jpg, jpeg, webp)")):
        with pytest.raises(ParamValidationError) as refused:
            image.resolve(escape)
        assert str(refused.value).startswith(sentence), str(refused.value)  # a sentence first, no regex


def test_params_live_on_the_dag_not_copied_into_every_task(templates_bag: DagBag):
    from airflow.serialization.serialized_objects import DagSerialization

    dag = templates_bag.dags["default"]
    assert {"prompt", "seed", "steps"} <= set(dag.params)
    assert all(not task.params for task in dag.tasks)  # merged in when a task runs (process_params)
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert restored.params.get_param("seed").value == dag.params.get_param("seed").value


def test_repeated_inputs_get_node_suffixed_params(templates_bag: DagBag):
    params = templates_bag.dags["sdxl_refiner_prompt_example"].params
    assert {"seed_10", "seed_11", "prompt_6", "prompt_15"} <= set(params)
    assert params.get_param("seed_10").schema["title"] == "Seed (node 10)"


# --- 2. the same through the CLI ----------------------------------------------------------------------------


def cli_json(proc: subprocess.CompletedProcess) -> list[dict]:
    """The JSON document of ``airflow ... -o json`` (Airflow logs to stdout too)."""
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            return json.loads(line)
    raise AssertionError(f"no JSON in:\n{proc.stdout}\n{proc.stderr}")


def test_cli_lists_the_dags_and_the_import_error(templates_folder: Path, templates_bag: DagBag, tmp_path: Path,
                                                 airflow_env, run_airflow):
    # templates_bag filled this session's parse cache: the CLI's parse reuses it (the result is the same).
    env = airflow_env(tmp_path / "home", templates_folder, cache_dir=get_settings().cache_dir)
    run_airflow("db", "migrate", env=env)
    run_airflow("dags", "reserialize", env=env)  # parses the bundle, writes DAGs and import errors to the DB
    with ThreadPoolExecutor(2) as pool:
        errors_run = pool.submit(run_airflow, "dags", "list-import-errors", "-o", "json", env=env, returncode=1)
        list_run = pool.submit(run_airflow, "dags", "list", "-o", "json", env=env)
    errors = cli_json(errors_run.result())
    assert [e["filepath"] for e in errors] == [ERROR_STUB.name]
    error = errors[0]["error"].partition(SENTINEL)[2]
    assert error.startswith("airflow-comfy: 152 workflow file(s)")
    blocks = error_blocks(error, templates_folder)
    assert set(blocks) == BAD_TEMPLATES
    assert "UNETLoader (node" in blocks["flux_dev_full_text_to_image.json"]
    dags = cli_json(list_run.result())
    assert {d["dag_id"] for d in dags} == GOOD_DAGS
    assert {Path(d["fileloc"]).name for d in dags} == {STUB.name}
    assert "Failed to load all files" in list_run.result().stderr


# --- 3. bad inputs never hide the good workflow -------------------------------------------------------------


def cycle_doc() -> dict:
    doc = txt2img()
    doc["20"] = {"class_type": "ImageInvert", "inputs": {"image": ["21", 0]}}
    doc["21"] = {"class_type": "ImageInvert", "inputs": {"image": ["20", 0]}}
    doc["9"]["inputs"]["images"] = ["21", 0]
    return doc


def unknown_class_doc() -> dict:
    doc = txt2img()
    doc["8"]["class_type"] = "NoSuchDecoder"
    return doc


def no_output_doc() -> dict:
    doc = txt2img()
    del doc["9"]
    return doc


def nan_cfg_text() -> str:
    text = json.dumps(txt2img(**{"3.cfg": math.nan}))
    assert '"cfg": NaN' in text
    return text


BAD = "bad.json"
BAD_INPUTS = {
    # id: (files besides default.json, the file the error names, fragments of its message, other good DAGs)
    "truncated_json": ({BAD: DEFAULT_TEXT[: len(DEFAULT_TEXT) // 2]}, BAD,
                       ["not valid JSON: Expecting value at line"], set()),
    "top_level_list": ({BAD: "[1, 2, 3]"}, BAD, ["the top level is a JSON list"], set()),
    "unknown_class_type": ({BAD: unknown_class_doc()}, BAD, ["unknown node types", "NoSuchDecoder (node 8)"], set()),
    "link_to_missing_node": ({BAD: txt2img(**{"8.samples": ["99", 0]})}, BAD,
                             ["node 8 (VAEDecode): input 'samples'", "node 99"], set()),
    "cycle": ({BAD: cycle_doc()}, BAD, ["node 21 (ImageInvert): dependency cycle: 21 <- 20 <- 21"], set()),
    "type_mismatch": ({BAD: txt2img(**{"8.samples": ["6", 0]})}, BAD,
                      ["node 8 (VAEDecode): input 'samples'",
                       "node 6 (CLIPTextEncode) output 0 is CONDITIONING, the input expects LATENT"], set()),
    "steps_zero": ({BAD: txt2img(**{"3.steps": 0})}, BAD,
                   ["node 3 (KSampler): input 'steps'", "smaller than min of 1"], set()),
    "cfg_1000": ({BAD: txt2img(**{"3.cfg": 1000})}, BAD,
                 ["node 3 (KSampler): input 'cfg'", "bigger than max of 100"], set()),
    "nan_literal": ({BAD: nan_cfg_text()}, BAD, ["node 3 (KSampler): input 'cfg'", "failed to convert nan"], set()),
    "combo_not_in_list": ({BAD: txt2img(**{"3.sampler_name": "nope"})}, BAD,
                          ["node 3 (KSampler): input 'sampler_name'", "value not in list", "'nope'"], set()),
    "model_path_escape": ({BAD: txt2img(**{"4.ckpt_name": "../../etc/passwd"})}, BAD,
                          ["node 4 (CheckpointLoaderSimple): input 'ckpt_name'", "'../../etc/passwd'", "escapes"],
                          set()),
    "output_path_escape": ({BAD: txt2img(**{"9.filename_prefix": "/abs/x"})}, BAD,
                           ["node 9 (SaveImage): input 'filename_prefix'", "'/abs/x'", "absolute"], set()),
    "too_large": ({BAD: txt2img(**{"6.text": "a cat " * 2000})}, BAD,
                  ["the limit is 8,000 bytes, [comfy] max_workflow_bytes"], set()),
    "no_output_node": ({BAD: no_output_doc()}, BAD, ["workflow has no output node"], set()),
    "sidecar_unknown_key": ({"styled.json": TXT2IMG, "styled.comfy.yaml": "schedule: '@daily'\nschedul: oops\n"},
                            "styled.comfy.yaml", ["sidecar: unknown key(s) 'schedul'"], set()),
    "sidecar_invalid_yaml": ({"styled.json": TXT2IMG, "styled.comfy.yaml": "tags: [a, b\n"},
                             "styled.comfy.yaml", ["sidecar: invalid YAML"], set()),
    "dag_id_collision": ({"a b.json": TXT2IMG, "a_b.json": TXT2IMG}, "a_b.json",
                         ["a_b' is already used by ", "a b.json; rename one file"], {"a_b"}),
}
MAX_BYTES = "8000"  # default.json is 5666 bytes


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_reported_and_the_good_workflow_still_loads(case: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    files, bad_file, fragments, also_good = BAD_INPUTS[case]
    monkeypatch.setenv("AIRFLOW__COMFY__MAX_WORKFLOW_BYTES", MAX_BYTES)
    folder = dags_folder(tmp_path / "dags", {"default.json": DEFAULT_TEXT, **files})
    bag = parse(folder)
    assert set(bag.dags) == {"default"} | also_good
    assert upstream(bag.dags["default"]) == {"inference": set(), "postprocess": {"inference"}}
    blocks = error_blocks(loader_error(bag, folder), folder)
    assert list(blocks) == [bad_file]
    for fragment in fragments:
        assert fragment in blocks[bad_file], (fragment, blocks[bad_file])
    assert f"{folder}/{bad_file}: " in "\n".join(bag.captured_warnings[str(folder / STUB.name)])


def test_many_bad_inputs_in_one_folder_are_each_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW__COMFY__MAX_WORKFLOW_BYTES", MAX_BYTES)
    files: dict = {"default.json": DEFAULT_TEXT}
    for case, (case_files, _, _, _) in BAD_INPUTS.items():
        files.update({f"{case}__{name}": doc for name, doc in case_files.items()})
    folder = dags_folder(tmp_path / "dags", files)
    bag = parse(folder)
    assert set(bag.dags) == {"default", "dag_id_collision__a_b"}
    blocks = error_blocks(loader_error(bag, folder), folder)
    assert set(blocks) == {f"{case}__{bad_file}" for case, (_, bad_file, _, _) in BAD_INPUTS.items()}
    for case, (_, bad_file, fragments, _) in BAD_INPUTS.items():
        message = blocks[f"{case}__{bad_file}"]
        assert all(fragment in message for fragment in fragments), (case, message)


# --- 4. sidecars ---------------------------------------------------------------------------------------------


SIDECARS = {
    "scheduled": """
        schedule: "0 6 * * *"
        tags: [marketing, catalog]
        owner: data-eng
        description: Product shots for the catalog
        priority: vip
        tasks:
          inference: {pool: gpu_big, retries: 3}
    """,
    "single": "slicing: single\n",
    "explicit": """
        groups:
          encode: ["6", "7"]
          sample: ["3", "5"]
          decode: ["8", "9"]
    """,
    "only_style": """
        params:
          style: {node: "6", input: text, title: Style prompt}
        auto_params: false
    """,
    "plus_sampler": """
        params:
          sampler: "3.sampler_name"
    """,
    "on_k8s": "backend: kubernetes\n",
}


@pytest.fixture(scope="module")
def sidecar_bag(tmp_path_factory: pytest.TempPathFactory) -> DagBag:
    files: dict[str, str] = {}
    for name, sidecar in SIDECARS.items():
        files[f"{name}.json"] = DEFAULT_TEXT
        files[f"{name}.comfy.yaml"] = textwrap.dedent(sidecar)
    folder = dags_folder(tmp_path_factory.mktemp("sidecars") / "dags", files)
    bag = parse(folder)
    assert not bag.import_errors, bag.import_errors
    assert set(bag.dags) == set(SIDECARS)
    return bag


def test_sidecar_sets_schedule_tags_owner_description_and_task_settings(sidecar_bag: DagBag):
    dag = sidecar_bag.dags["scheduled"]
    assert dag.schedule == "0 6 * * *"
    assert dag.timetable.expression == "0 6 * * *"
    assert dag.start_date is not None
    assert set(dag.tags) == {"comfyui", "marketing", "catalog"}
    assert dag.owner == "data-eng"
    assert dag.description == "Product shots for the catalog"
    assert "Product shots for the catalog" in dag.doc_md
    inference, postprocess = dag.get_task("inference"), dag.get_task("postprocess")
    assert (inference.pool, inference.retries) == ("gpu_big", 3)
    assert (postprocess.pool, postprocess.retries) == ("default_pool", 0)
    # priority: vip is the runs' default tier: every task carries its weight, as its own (absolute) weight
    assert {(t.priority_weight, t.weight_rule) for t in dag.tasks} == {(10_000, "absolute")}
    tier = dag.params.get_param("tier")
    assert (tier.value, tier.schema["enum"]) == ("vip", ["vip", "high", "normal", "batch"])
    assert {t.priority_weight for t in sidecar_bag.dags["single"].tasks} == {100}  # default_tier: normal
    # a sidecar without a schedule: triggered only
    assert sidecar_bag.dags["single"].schedule is None


def test_sidecar_slicing_single_makes_one_task(sidecar_bag: DagBag):
    dag = sidecar_bag.dags["single"]
    (task,) = dag.tasks
    assert "one group (slicing: single)" in dag.doc_md
    assert f"| `{task.task_id}` | 3 KSampler, 5 EmptyLatentImage, 6 CLIPTextEncode, 7 CLIPTextEncode, 8 VAEDecode, " \
        "9 SaveImage |" in dag.doc_md
    assert "Runs 7 node(s)" in task.doc_md


def test_sidecar_groups_name_the_tasks(sidecar_bag: DagBag):
    dag = sidecar_bag.dags["explicit"]
    assert upstream(dag) == {"encode": set(), "sample": {"encode"}, "decode": {"sample"}}
    assert "groups assigned in the sidecar" in dag.doc_md


def test_sidecar_params(sidecar_bag: DagBag):
    only = sidecar_bag.dags["only_style"].params
    assert list(only) == ["style", "tier"]  # auto_params: false still leaves the run's tier
    style = only.get_param("style")
    assert style.schema["title"] == "Style prompt"
    assert style.value == template_node("default.json", 6)["widgets_values"][0]
    plus = sidecar_bag.dags["plus_sampler"].params
    assert {"seed", "steps", "prompt", "sampler"} <= set(plus)
    sampler = plus.get_param("sampler")
    assert sampler.value == "euler" and "euler" in sampler.schema["enum"]
    with pytest.raises(ParamValidationError):
        sampler.resolve("nope")


def test_sidecar_backend_kubernetes_makes_pod_tasks(sidecar_bag: DagBag):
    tasks = sidecar_bag.dags["on_k8s"].tasks
    assert [t.task_id for t in tasks] == ["inference", "postprocess"]
    assert all(isinstance(t, ComfyGroupPodOperator) for t in tasks)
    assert all(isinstance(t, ComfyGroupLocalOperator) for t in sidecar_bag.dags["single"].tasks)


def test_sidecar_naming_a_task_that_does_not_exist_is_an_error(tmp_path: Path):
    folder = dags_folder(tmp_path / "dags", {
        "default.json": DEFAULT_TEXT, "typo.json": DEFAULT_TEXT,
        "typo.comfy.yaml": "tasks:\n  inferense: {pool: gpu_big}\n"})
    bag = parse(folder)
    assert set(bag.dags) == {"default"}
    message = error_blocks(loader_error(bag, folder), folder)["typo.comfy.yaml"]
    assert "'inferense' do not exist" in message and "inference, postprocess" in message


# --- 5. parse cache -----------------------------------------------------------------------------------------


def test_unchanged_workflows_come_from_the_parse_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRFLOW__COMFY__CACHE_DIR", str(cache))
    lora_text = (TEMPLATES / "lora.json").read_text(encoding="utf-8")
    folder = dags_folder(tmp_path / "dags", {"default.json": DEFAULT_TEXT, "lora.json": lora_text,
                                             "copy.json": DEFAULT_TEXT})

    def entries() -> dict[str, dict]:
        """The compiled workflows in the cache (verdicts left out)."""
        return {p.name: json.loads(p.read_text()) for p in cache.glob("*/*.json")
                if not p.name.endswith(".verdict.json")}

    clear_memory()  # as in a fresh dag-processor process
    first = parse(folder)
    assert set(first.dags) == {"default", "lora", "copy"}
    # one entry per file, named by a content hash; a copied file is its own DAG, not a cache alias
    assert sorted(e["dag_id"] for e in entries().values()) == ["copy", "default", "lora"]
    assert all(re.fullmatch(r"[0-9a-f]{64}\.json", name) for name in entries())

    # An unchanged folder is not compiled again: what the cache holds is what the next parse serves.
    lora_name = next(name for name, entry in entries().items() if entry["dag_id"] == "lora")
    lora_entry = next(cache.glob(f"*/{lora_name}"))
    data = json.loads(lora_entry.read_text())
    data["doc_md"] = "served from the parse cache"
    lora_entry.write_text(json.dumps(data))
    clear_memory()
    second = parse(folder)
    assert second.dags["lora"].doc_md == "served from the parse cache"
    assert len(entries()) == 3

    # One byte changed: that workflow is compiled again (new prompt default), the others still come from cache,
    # and the entry of the old bytes is removed: the cache holds one entry per file of the folder.
    old_default = {n for n, e in entries().items() if e["dag_id"] == "default"}
    changed = DEFAULT_TEXT.replace("purple galaxy bottle", "purple galaxy bottlE")
    assert changed != DEFAULT_TEXT
    (folder / "default.json").write_text(changed, encoding="utf-8")
    clear_memory()
    third = parse(folder)
    assert third.dags["default"].params.get_param("prompt").value.endswith("purple galaxy bottlE,")
    assert third.dags["copy"].params.get_param("prompt").value.endswith("purple galaxy bottle,")
    assert third.dags["lora"].doc_md == "served from the parse cache"
    assert len(entries()) == 3 and not old_default & set(entries())
    assert len(list(cache.glob("*/*.verdict.json"))) == 3

    # Files removed from the folder leave the cache at the next parse.
    (folder / "copy.json").unlink()
    (folder / "lora.json").unlink()
    clear_memory()
    assert set(parse(folder).dags) == {"default"}
    assert [e["dag_id"] for e in entries().values()] == ["default"]


def test_known_files_are_neither_compiled_nor_checked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each file's verdict is written once: later parses of the error stub read it, and a bad file is not
    compiled again by either stub (nor its verdict rewritten) until it changes."""
    from airflow_comfy.factory import loader

    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRFLOW__COMFY__CACHE_DIR", str(cache))
    folder = dags_folder(tmp_path / "dags", {"default.json": DEFAULT_TEXT, BAD: txt2img(**{"3.steps": 0})})
    clear_memory()
    first = parse(folder)
    assert set(first.dags) == {"default"} and "smaller than min of 1" in loader_error(first, folder)
    verdicts = {p: p.stat().st_mtime_ns for p in cache.glob("*/*.verdict.json")}
    assert len(verdicts) == 2

    compiled: list[str] = []
    real_compile = loader.compile_workflow
    monkeypatch.setattr(loader, "compile_workflow", lambda path, *a, **k: compiled.append(path.name)
                        or real_compile(path, *a, **k))
    clear_memory()
    second = parse(folder)
    assert set(second.dags) == {"default"} and "smaller than min of 1" in loader_error(second, folder)
    assert compiled == []
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*.verdict.json")} == verdicts


def test_corrupt_cache_entries_are_recompiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRFLOW__COMFY__CACHE_DIR", str(cache))
    folder = dags_folder(tmp_path / "dags", {"default.json": DEFAULT_TEXT})
    clear_memory()
    assert set(parse(folder).dags) == {"default"}
    (entry,) = (p for p in cache.glob("*/*.json") if not p.name.endswith(".verdict.json"))
    (verdict,) = cache.glob("*/*.verdict.json")
    entry.write_text('{"dag_id": "defa')
    verdict.write_text('{"probl')
    clear_memory()
    bag = parse(folder)
    assert not bag.import_errors
    assert [t.task_id for t in bag.dags["default"].tasks] == ["inference", "postprocess"]
    assert json.loads(entry.read_text())["dag_id"] == "default"


# --- 6. import purity ---------------------------------------------------------------------------------------


def run_python(code: str, tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


HEAVY = ("torch", "diffusers", "transformers")


def test_airflow_side_never_imports_torch(tmp_path: Path):
    folder = dags_folder(tmp_path / "dags", {"default.json": DEFAULT_TEXT})
    out = run_python(f"""
        import sys
        import airflow_comfy.factory, airflow_comfy.factory.loader, airflow_comfy.operators.pod, airflow_comfy.cli
        import airflow_comfy.scheduling.policy  # imported by every Airflow process (the airflow.policy entry point)
        from airflow_comfy import load_workflows
        assert set(load_workflows({str(folder)!r})) == {{"default"}}
        assert "airflow" in sys.modules
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
    """, tmp_path)
    assert out.strip() == "[]"


def test_workflow_package_imports_neither_airflow_nor_torch(tmp_path: Path):
    out = run_python(f"""
        import importlib, pkgutil, sys
        import airflow_comfy.artifacts, airflow_comfy.workflow
        names = [m.name for pkg in (airflow_comfy.workflow, airflow_comfy.artifacts)
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        assert "airflow_comfy.workflow.params" in names and "airflow_comfy.workflow.slicing" in names
        print(sorted(m for m in sys.modules if m.split(".")[0] in {("airflow", *HEAVY)!r}))
    """, tmp_path)
    assert out.strip() == "[]"


# --- 7. provider registration -------------------------------------------------------------------------------


def test_airflow_knows_the_provider_and_its_config_defaults(tmp_path: Path, airflow_env, run_airflow):
    env = airflow_env(tmp_path / "home")
    with ThreadPoolExecutor(2) as pool:
        providers_run = pool.submit(run_airflow, "providers", "list", "-o", "json", env=env)
        backend_run = pool.submit(run_airflow, "config", "get-value", "comfy", "backend", env=env)
    comfy = [p for p in cli_json(providers_run.result()) if p["package_name"] == "airflow-comfy"]
    assert len(comfy) == 1 and comfy[0]["version"]
    assert backend_run.result().stdout.strip() == "local"
