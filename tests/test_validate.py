"""Validation follows ComfyUI's rules and every error names file, node id, class type and input."""

from __future__ import annotations

import math

import pytest
from workflow_builders import OBJECT_INFO, object_info, txt2img

from airflow_comfy.workflow.api_format import convert_api
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.graph import Link
from airflow_comfy.workflow.validate import path_escape_reason, types_compatible, validate

CATALOG = Catalog.builtin()


def check(doc: dict, catalog: Catalog = CATALOG):
    return validate(convert_api(doc, name="wf", source="wf.json"), catalog)


def problems(doc: dict, catalog: Catalog = CATALOG):
    with pytest.raises(WorkflowError) as info:
        check(doc, catalog)
    return info.value.problems


def only(doc: dict):
    found = problems(doc)
    assert len(found) == 1, found
    assert found[0].file == "wf.json"
    return found[0]


def test_valid_workflow_passes_and_coerces_constants():
    wf = check(txt2img(**{"3.cfg": 8, "3.steps": "20"}))
    assert wf.nodes["3"].inputs["cfg"] == 8.0 and isinstance(wf.nodes["3"].inputs["cfg"], float)
    assert wf.nodes["3"].inputs["steps"] == 20 and isinstance(wf.nodes["3"].inputs["steps"], int)
    assert wf.nodes["3"].inputs["model"] == Link("4", 0)


def test_prunes_to_ancestors_of_output_nodes():
    doc = txt2img()
    doc["20"] = {"class_type": "LoadImage", "inputs": {"image": "unused.png"}}
    doc["21"] = {"class_type": "ImageInvert", "inputs": {"image": ["20", 0]}}
    assert set(check(doc).nodes) == {"3", "4", "5", "6", "7", "8", "9"}


def test_required_input_missing_names_node_class_and_input():
    p = only(txt2img(**{"3.seed": None}))
    assert (p.kind, p.node_id, p.class_type, p.input_name) == ("required_input_missing", "3", "KSampler", "seed")
    assert "wf.json: node 3 (KSampler): input 'seed'" in str(p)


@pytest.mark.parametrize("changes, kind, input_name", [
    ({"3.steps": 0}, "value_smaller_than_min", "steps"),
    ({"3.cfg": 1000}, "value_bigger_than_max", "cfg"),
    ({"5.width": 8}, "value_smaller_than_min", "width"),
    ({"3.cfg": math.nan}, "invalid_input_type", "cfg"),
    ({"3.steps": 2.5}, "invalid_input_type", "steps"),
    ({"3.seed": "abc"}, "invalid_input_type", "seed"),
    ({"3.sampler_name": "nope"}, "value_not_in_list", "sampler_name"),
    ({"3.scheduler": "kl_optimal"}, "value_not_in_list", "scheduler"),
    ({"3.model": "not-a-link"}, "bad_linked_input", "model"),
])
def test_bad_values(changes, kind, input_name):
    p = only(txt2img(**changes))
    assert (p.kind, p.input_name) == (kind, input_name)
    assert p.node_id and p.class_type


def test_sampler_unsupported_by_runner_is_refused_with_the_supported_list():
    p = only(txt2img(**{"3.sampler_name": "dpmpp_3m_sde"}))
    assert "dpmpp_3m_sde" in p.message and "euler" in p.message


def test_type_mismatch_on_link():
    p = only(txt2img(**{"8.samples": ["6", 0]}))
    assert p.kind == "return_type_mismatch"
    assert (p.node_id, p.class_type, p.input_name) == ("8", "VAEDecode", "samples")
    assert "CONDITIONING" in p.message and "LATENT" in p.message


def test_link_to_out_of_range_output():
    p = only(txt2img(**{"3.model": ["4", 7]}))
    assert p.kind == "bad_linked_input" and "output 7" in p.message


@pytest.mark.parametrize("changes, input_name", [
    ({"4.ckpt_name": "../../etc/passwd"}, "ckpt_name"),
    ({"4.ckpt_name": "/etc/passwd"}, "ckpt_name"),
    ({"4.ckpt_name": "C:\\models\\x.safetensors"}, "ckpt_name"),
    ({"9.filename_prefix": "../outside"}, "filename_prefix"),
    ({"9.filename_prefix": "/abs/x"}, "filename_prefix"),
])
def test_path_escapes_are_errors(changes, input_name):
    p = only(txt2img(**changes))
    assert (p.kind, p.input_name) == ("path_escape", input_name)


def test_subfolders_and_annotations_stay_inside():
    assert path_escape_reason("sd/v1.safetensors") is None
    assert path_escape_reason("photo.png [input]") is None
    assert path_escape_reason("a..b.png") is None
    assert path_escape_reason("sub/../../x") is not None
    assert path_escape_reason("x\x00.png") is not None


def test_all_problems_reported_together():
    found = problems(txt2img(**{"3.steps": 0, "3.cfg": -1, "5.width": 1}))
    assert {(p.node_id, p.input_name) for p in found} == {("3", "steps"), ("3", "cfg"), ("5", "width")}


def test_no_output_node():
    doc = txt2img()
    del doc["9"]
    p = only(doc)
    assert p.kind == "prompt_no_outputs"


def test_unknown_class_type():
    doc = txt2img()
    doc["10"] = {"class_type": "MysteryNode", "inputs": {}}
    p = only(doc)
    assert (p.kind, p.node_id, p.class_type) == ("unknown_node_type", "10", "MysteryNode")


def test_cycle_is_reported_with_its_nodes():
    doc = txt2img()
    doc["10"] = {"class_type": "ImageInvert", "inputs": {"image": ["11", 0]}}
    doc["11"] = {"class_type": "ImageInvert", "inputs": {"image": ["10", 0]}}
    doc["9"]["inputs"]["images"] = ["10", 0]
    p = only(doc)
    assert p.kind == "dependency_cycle" and "10" in p.message and "11" in p.message


def test_known_but_not_runnable_nodes_are_refused_listing_the_types(reference_catalog):
    doc = txt2img()
    doc["10"] = {"class_type": "ImageSharpen", "inputs": {"image": ["8", 0], "sharpen_radius": 1,
                                                           "sigma": 1.0, "alpha": 1.0}}
    doc["11"] = {"class_type": "ImageBlur", "inputs": {"image": ["10", 0], "blur_radius": 1, "sigma": 1.0}}
    doc["9"]["inputs"]["images"] = ["11", 0]
    with pytest.raises(WorkflowError) as info:
        check(doc, reference_catalog)
    summary = info.value.summary()
    assert "cannot execute" in summary and "ImageBlur (node 11)" in summary and "ImageSharpen (node 10)" in summary
    # The same graph converts and validates when runnability is not required (e.g. `airflow-comfy convert`).
    wf = validate(convert_api(doc, name="wf", source="wf.json"), reference_catalog, require_runnable=False)
    assert "11" in wf.nodes


def test_types_compatible_follows_comfyui():
    assert types_compatible("IMAGE", "IMAGE")
    assert types_compatible("*", "MODEL")
    assert types_compatible("IMAGE,MASK", "MASK")
    assert not types_compatible("LATENT", "IMAGE")


@pytest.fixture(scope="module")
def reference_catalog():
    return CATALOG.extended(object_info(), source=str(OBJECT_INFO))


def _with_load_image(name: str) -> dict:
    """txt2img whose sampler starts from an encoded input image ``name``."""
    doc = txt2img()
    doc["10"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    doc["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    doc["3"]["inputs"]["latent_image"] = ["11", 0]
    return doc


@pytest.mark.parametrize("name, sentence", [
    ("../secret.png", "'../secret.png' leaves the input folder"),
    ("/etc/x.png", "'/etc/x.png' is an absolute path"),
    ("x.gif", "'x.gif' is not an image type the runner reads (png, jpg, jpeg, webp)"),
])
def test_load_image_names_the_runner_would_refuse_are_sentences(name: str, sentence: str):
    problem = only(_with_load_image(name))
    assert (problem.kind, problem.node_id, problem.input_name) == ("bad_input_image", "10", "image")
    assert sentence in problem.message


@pytest.mark.parametrize("name", ["photo.png", "shots/photo.JPEG", "photo.webp [input]",
                                  "s3://bucket/inputs/photo.png", "file:///data/input/photo.png"])
def test_load_image_names_and_uris_pass(name: str):
    # URIs are judged where the input folder and store are known (trigger time and the runner)
    assert check(_with_load_image(name)).nodes["10"].inputs["image"] == name
