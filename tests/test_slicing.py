"""Slicing: groups from sidecar / UI boxes / stages; the boundary rule; acyclic, parallel, deterministic."""

from __future__ import annotations

import copy
import json
import random

import pytest
from workflow_builders import EXAMPLES, TEMPLATES, txt2img

from airflow_comfy.workflow.api_format import convert_api
from airflow_comfy.workflow.catalog import SERIALIZABLE_TYPES, Catalog
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.groupspec import GroupSpec
from airflow_comfy.workflow.loader import load_workflow
from airflow_comfy.workflow.slicing import slice_workflow
from airflow_comfy.workflow.validate import validate

CATALOG = Catalog.builtin()
CORE_TEMPLATES = [
    "2_pass_pose_worship", "area_composition", "area_composition_square_area_for_subject", "controlnet_example",
    "default", "depth_controlnet", "depth_t2i_adapter", "embedding_example", "esrgan_example",
    "hiresfix_esrgan_workflow", "hiresfix_latent_workflow", "image2image", "inpaint_example",
    "inpaint_model_outpainting", "latent_upscale_different_prompt_model", "lora", "lora_multiple",
    "mixing_controlnets", "sdxl_refiner_prompt_example", "sdxl_simple_example",
]


def api(doc: dict):
    return validate(convert_api(doc, name="wf", source="wf.json"), CATALOG)


def groups_of(graph) -> dict[str, list[str]]:
    return {g.name: g.nodes for g in graph.groups}


def test_txt2img_stages_and_recipe_components():
    graph = slice_workflow(api(txt2img()), CATALOG)
    assert graph.mode == "stages"
    assert groups_of(graph) == {"inference": ["3", "5", "6", "7"], "postprocess": ["8", "9"]}
    inference, post = graph.groups
    assert inference.recipe_nodes == ["4"] and inference.components == {"4": ["MODEL", "CLIP"]}
    # The decode group needs only the VAE of the checkpoint.
    assert post.recipe_nodes == ["4"] and post.components == {"4": ["VAE"]}
    assert [(v.node, v.output, v.type, v.group) for v in post.boundary_inputs] == [("3", 0, "LATENT", "inference")]
    assert [(p.node, p.type, p.consumers) for p in inference.persist] == [("3", "LATENT", ("postprocess",))]
    assert post.upstream == ["inference"]


def test_image_loading_and_encoding_form_the_preprocess_stage():
    wf = load_workflow(TEMPLATES / "image2image.json", CATALOG)
    graph = slice_workflow(validate(wf, CATALOG), CATALOG, mode="stages")
    classes = {g.name: sorted(wf.nodes[n].class_type for n in g.nodes) for g in graph.groups}
    assert classes["preprocess"] == ["ImageScaleToTotalPixels", "LoadImage", "VAEEncode"]
    assert classes["postprocess"] == ["SaveImage", "VAEDecode"]
    assert "KSampler" in classes["inference"]


@pytest.mark.parametrize("name", CORE_TEMPLATES)
@pytest.mark.parametrize("mode", ["auto", "stages", "single"])
def test_core_templates_slice_into_a_valid_partition(name, mode):
    wf = validate(load_workflow(TEMPLATES / f"{name}.json", CATALOG), CATALOG)
    graph = slice_workflow(wf, CATALOG, mode=mode)
    assert_valid_partition(wf, graph)


def assert_valid_partition(wf, graph):
    owners: dict[str, str] = {}
    position = {g.name: i for i, g in enumerate(graph.groups)}
    for group in graph.groups:
        for node_id in group.nodes:
            assert node_id not in owners, f"node {node_id} in two groups"
            owners[node_id] = group.name
    recipe_only = {nid for nid, n in wf.nodes.items() if CATALOG.get(n.class_type).produces_only_unserializable}
    assert set(owners) | recipe_only == set(wf.nodes)
    for group in graph.groups:
        members = set(group.nodes) | set(group.recipe_nodes)
        boundary = {(v.node, v.output) for v in group.boundary_inputs}
        for node_id in members:
            for link in wf.nodes[node_id].links().values():
                if link.node in members:
                    continue
                # Anything read from elsewhere is a serializable value from an earlier group.
                assert (link.node, link.output) in boundary
                value = next(v for v in group.boundary_inputs if (v.node, v.output) == tuple(link))
                assert value.type in SERIALIZABLE_TYPES
                assert owners[link.node] == value.group
                assert position[value.group] < position[group.name], "group graph must be topological"


def test_ui_groups_by_centre_rule_and_loader_replayed():
    wf = validate(load_workflow(EXAMPLES / "txt2img_grouped.json", CATALOG), CATALOG)
    graph = slice_workflow(wf, CATALOG)
    assert graph.mode == "ui-groups"
    assert groups_of(graph) == {"prompts": ["2", "3"], "sampling": ["4", "5"], "decode_and_save": ["6", "7"]}
    assert [g.title for g in graph.groups] == ["Prompts", "Sampling", "Decode and save"]
    assert {g.name: g.components for g in graph.groups} == {
        "prompts": {"1": ["CLIP"]}, "sampling": {"1": ["MODEL"]}, "decode_and_save": {"1": ["VAE"]}}


def _grouped_doc() -> dict:
    return json.loads((EXAMPLES / "txt2img_grouped.json").read_text())


def test_nested_group_smallest_box_wins_and_centre_decides():
    doc = _grouped_doc()
    # An outer box around everything, listed first: the inner, smaller boxes still win.
    doc["groups"].insert(0, {"id": 9, "title": "Everything", "bounding": [0, 0, 2000, 1000], "flags": {}})
    wf = validate(load_workflow_from(doc), CATALOG)
    assert groups_of(slice_workflow(wf, CATALOG)) == {
        "prompts": ["2", "3"], "sampling": ["4", "5"], "decode_and_save": ["6", "7"]}
    # Move the negative prompt so its centre (not its corner) lies in the sampling box.
    doc = _grouped_doc()
    node3 = next(n for n in doc["nodes"] if n["id"] == 3)
    node3["pos"] = [700, 340]  # body spans 700..1080; centre x = 890 is inside Sampling (880..1220)
    wf = validate(load_workflow_from(doc), CATALOG)
    assert groups_of(slice_workflow(wf, CATALOG))["sampling"] == ["3", "4", "5"]


def test_ungrouped_node_joins_its_consumers_group():
    doc = _grouped_doc()
    node4 = next(n for n in doc["nodes"] if n["id"] == 4)
    node4["pos"] = [3000, 3000]  # EmptyLatentImage outside every box
    wf = validate(load_workflow_from(doc), CATALOG)
    assert groups_of(slice_workflow(wf, CATALOG))["sampling"] == ["4", "5"]


def load_workflow_from(doc: dict):
    from airflow_comfy.workflow.ui_format import convert_ui

    return convert_ui(doc, CATALOG, name="grouped", source="grouped.json")


def test_sidecar_assignment_wins_and_cycles_are_merged():
    wf = api(txt2img())
    graph = slice_workflow(wf, CATALOG, assignment={"text": ["6", "7"], "sample": ["3", "5"], "out": ["8", "9"]})
    assert graph.mode == "sidecar"
    assert groups_of(graph) == {"text": ["6", "7"], "sample": ["3", "5"], "out": ["8", "9"]}
    # text -> sample (conditioning) and sample -> text (latent to the decoder): a cycle; the groups merge.
    graph = slice_workflow(wf, CATALOG, assignment={"a": ["6", "7", "8", "9"], "b": ["3", "5"]})
    assert len(graph.groups) == 1
    assert sorted(graph.groups[0].nodes, key=int) == ["3", "5", "6", "7", "8", "9"]
    assert graph.groups[0].name == "b_a"  # merged names, ordered by their first node id


def test_sidecar_assignment_of_unknown_node_is_an_error():
    with pytest.raises(WorkflowError) as info:
        slice_workflow(api(txt2img()), CATALOG, assignment={"a": ["6", "77"]})
    assert info.value.problems[0].node_id == "77" and "sidecar" in str(info.value)


def test_independent_branches_stay_parallel():
    doc = txt2img()
    # A second, independent sampler chain sharing only the checkpoint (a replayed recipe).
    for old, new in {"3": "13", "5": "15", "6": "16", "7": "17", "8": "18", "9": "19"}.items():
        node = copy.deepcopy(doc[old])
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in ("3", "5", "6", "7", "8"):
                node["inputs"][name] = [str(int(value[0]) + 10), value[1]]
        doc[new] = node
    graph = slice_workflow(api(doc), CATALOG)
    names = [g.name for g in graph.groups]
    assert sorted(names) == ["inference_1", "inference_2", "postprocess_1", "postprocess_2"]
    inference = {g.name: g for g in graph.groups}
    assert inference["inference_1"].upstream == [] and inference["inference_2"].upstream == []


def test_single_mode_keeps_one_group():
    graph = slice_workflow(api(txt2img()), CATALOG, mode="single")
    assert groups_of(graph) == {"main": ["3", "5", "6", "7", "8", "9"]}
    assert graph.groups[0].boundary_inputs == [] and graph.groups[0].components == {"4": ["MODEL", "CLIP", "VAE"]}


def test_slicing_is_deterministic_whatever_the_node_order():
    doc = txt2img()
    reference = [s.to_json() for s in slice_workflow(api(doc), CATALOG).specs(workflow_sha256="x")]
    rng = random.Random(3)
    for _ in range(5):
        items = list(doc.items())
        rng.shuffle(items)
        shuffled = [s.to_json() for s in slice_workflow(api(dict(items)), CATALOG).specs(workflow_sha256="x")]
        assert shuffled == reference


def test_specs_round_trip_and_carry_metadata_only_where_images_are_saved():
    graph = slice_workflow(api(txt2img()), CATALOG)
    specs = graph.specs(workflow_sha256="abc", metadata={"prompt": {"k": 1}, "workflow": None})
    assert [bool(s.metadata) for s in specs] == [False, True]
    assert specs[1].output_nodes == ["9"]
    for spec in specs:
        again = GroupSpec.from_data_uri(spec.to_data_uri())
        assert again.to_dict() == spec.to_dict()
    assert set(specs[0].nodes) == {"3", "4", "5", "6", "7"}  # own nodes plus the replayed loader
    with pytest.raises(ValueError, match="version"):
        GroupSpec.from_dict(dict(specs[0].to_dict(), version=99))
