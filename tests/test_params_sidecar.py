"""Trigger params from the workflow, and the sidecar's validation."""

from __future__ import annotations

import re

import pytest
from workflow_builders import TEMPLATES, txt2img

from airflow_comfy.factory.sidecar import parse_sidecar
from airflow_comfy.workflow.api_format import convert_api
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.inputs import INPUT_IMAGE_FORMAT
from airflow_comfy.workflow.loader import load_workflow
from airflow_comfy.workflow.params import SAFE_FILE_NAME_PATTERN, discover_params
from airflow_comfy.workflow.validate import validate

CATALOG = Catalog.builtin()


def params_of(doc: dict, **kwargs):
    wf = validate(convert_api(doc, name="wf", source="wf.json"), CATALOG)
    return {p.name: p for p in discover_params(wf, CATALOG, **kwargs)}


def test_txt2img_params_are_typed_bounded_and_default_to_the_workflow():
    params = params_of(txt2img())
    assert set(params) == {"prompt", "negative_prompt", "seed", "steps", "cfg", "denoise",
                           "width", "height", "batch_size"}
    assert params["prompt"].default == "a cat" and params["prompt"].schema == {"type": "string", "format": "multiline"}
    assert params["negative_prompt"].default == "blurry"
    assert params["seed"].schema == {"type": "integer", "minimum": 0, "maximum": 2**64 - 1}
    assert params["cfg"].schema["type"] == "number" and params["cfg"].schema["maximum"] == 100.0
    assert params["width"].schema["minimum"] == 16
    assert params["prompt"].title == "Prompt" and "CLIPTextEncode node 6" in params["prompt"].description
    assert [(b.node, b.input) for b in params["seed"].bindings] == [("3", "seed")]


def test_linked_inputs_are_not_params():
    doc = txt2img()
    doc["10"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    doc["3"]["inputs"]["latent_image"] = ["10", 0]
    del doc["5"]
    assert params_of(doc)["width"].default == 64


def test_duplicate_names_get_node_suffixes():
    wf = validate(load_workflow(TEMPLATES / "sdxl_simple_example.json", CATALOG), CATALOG)
    names = {p.name for p in discover_params(wf, CATALOG)}
    assert {"seed_10", "seed_11", "prompt_6", "prompt_15", "negative_prompt_7", "negative_prompt_16"} <= names
    assert "seed" not in names


def test_roles_follow_controlnet_outputs():
    wf = validate(load_workflow(TEMPLATES / "controlnet_example.json", CATALOG), CATALOG)
    params = {p.name: p for p in discover_params(wf, CATALOG)}
    assert params["prompt"].bindings[0].node == "6" and params["negative_prompt"].bindings[0].node == "7"
    # an image param is checked by its format (sentences), not by a regular expression
    assert params["image"].schema == {"type": "string", "format": INPUT_IMAGE_FORMAT, "minLength": 1}
    assert "s3:// URI in the input store" in params["image"].description


def test_model_file_param_pattern_refuses_escapes():
    pattern = re.compile(SAFE_FILE_NAME_PATTERN)
    assert pattern.match("photo.safetensors") and pattern.match("sub/dir/photo.safetensors")
    for bad in ("../x.png", "/etc/passwd", "a/../../b", "C:\\x.png", "..\\x"):
        assert not pattern.match(bad), bad


def test_declared_params_and_auto_off():
    params = params_of(txt2img(), auto=False, declared={"prefix": "9.filename_prefix",
                                                        "strength": {"node": "3", "input": "denoise", "title": "How much"}})
    assert set(params) == {"prefix", "strength"}
    assert params["strength"].title == "How much" and params["prefix"].default == "ComfyUI"


@pytest.mark.parametrize("declared, fragment", [
    ({"bad name": "3.seed"}, "identifier"),
    ({"x": "99.seed"}, "node '99'"),
    ({"x": "3.nope"}, "no widget input 'nope'"),
    ({"x": "3.model"}, "no widget input 'model'"),
])
def test_declared_param_errors(declared, fragment):
    with pytest.raises(WorkflowError, match=re.escape(fragment)):
        params_of(txt2img(), declared=declared)


def test_sidecar_parses_dag_and_task_settings():
    sidecar = parse_sidecar("""
schedule: "@daily"
tags: [a, b]
slicing: single
priority: vip
retries: 2
tasks:
  main: {pool: gpu, resources: {limits: {nvidia.com/gpu: 1}}}
""", "x.comfy.yaml")
    assert sidecar.schedule == "@daily" and sidecar.tags == ["a", "b"] and sidecar.slicing == "single"
    assert sidecar.priority == "vip"  # the default tier of the workflow's runs, not a task setting
    assert sidecar.task_settings("main") == {"retries": 2, "pool": "gpu",
                                             "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    assert sidecar.task_settings("other") == {"retries": 2}


@pytest.mark.parametrize("text, fragment", [
    ("schedul: daily", "unknown key(s) 'schedul'"),
    ("slicing: weird", "slicing must be one of"),
    ("priority: [vip]", "priority must be a string"),
    ("tasks: {a: {priority: vip}}", "tasks.a.priority: a tier is chosen per run"),
    ("priority_weight: 5", "priority_weight is no longer supported: a task's priority weight is its run's tier"),
    ("tasks: {a: {priority_weight: 5}}", "tasks.a.priority_weight is no longer supported"),
    ("priority_class_name: Bad_Class", "priority_class_name: 'Bad_Class' is not a valid Kubernetes object name"),
    ("retries: -1", "retries must be an integer >= 0"),
    ("retries: true", "retries must be an integer"),
    ("groups: {'bad id!': ['1']}", "not a valid task id"),
    ("tasks: {a: {colour: red}}", "tasks.a: unknown key(s) 'colour'"),
    ("resources: {limits: {cpu: 1}, extra: {}}", "only have 'requests' and 'limits'"),
    ("tolerations: {key: x}", "tolerations must be a list"),
    ("[1, 2]", "must be a YAML mapping"),
    ("key: [unclosed", "invalid YAML"),
])
def test_sidecar_errors_name_the_file(text, fragment):
    with pytest.raises(WorkflowError) as info:
        parse_sidecar(text, "wf.comfy.yaml")
    assert fragment in str(info.value) and str(info.value).startswith("wf.comfy.yaml: ")


def test_auto_params_list_offers_the_sampler_and_scheduler_as_choices():
    from airflow_comfy.workflow.core_nodes import SUPPORTED_SAMPLERS, SUPPORTED_SCHEDULERS

    doc = txt2img()
    params = params_of(doc, auto=["sampler", "scheduler"])
    assert {"prompt", "seed", "steps", "sampler", "scheduler"} <= set(params)  # added to the automatic ones
    sampler, scheduler = params["sampler"], params["scheduler"]
    assert sampler.schema == {"type": "string", "enum": list(SUPPORTED_SAMPLERS)}
    assert scheduler.schema == {"type": "string", "enum": list(SUPPORTED_SCHEDULERS)}
    assert sampler.default == doc["3"]["inputs"]["sampler_name"] and scheduler.default == doc["3"]["inputs"]["scheduler"]
    assert [(b.node, b.input) for b in sampler.bindings] == [("3", "sampler_name")]
    assert (sampler.title, scheduler.title) == ("Sampler", "Scheduler")
    assert "sampler" not in params_of(doc)  # only when listed
    assert set(params_of(doc, auto=["scheduler"])) - set(params_of(doc)) == {"scheduler"}


def test_auto_params_sampler_of_two_samplers_gets_node_suffixes():
    wf = validate(load_workflow(TEMPLATES / "sdxl_simple_example.json", CATALOG), CATALOG)
    names = {p.name for p in discover_params(wf, CATALOG, auto=["sampler"])}
    assert {"sampler_10", "sampler_11"} <= names and "sampler" not in names


@pytest.mark.parametrize("text, fragment", [
    ("auto_params: [smapler]", "auto_params: 'smapler' is not an automatic param; the names are prompt,"),
    ("auto_params: [sampler, 3]", "auto_params must be true, false or a list of param names"),
    ("auto_params: yes-please", "auto_params must be true, false or a list"),
])
def test_auto_params_errors_name_the_sidecar(text, fragment):
    with pytest.raises(WorkflowError) as info:
        parse_sidecar(text, "portrait.comfy.yaml")
    assert str(info.value).startswith("portrait.comfy.yaml: ") and fragment in str(info.value)
