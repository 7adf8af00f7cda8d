"""UI / API format conversion into the canonical graph: ComfyUI's API ("prompt") format and the frontend's
saved workflow (schema version 0.4, subgraphs, groups), converted the way the frontend's ``graphToPrompt``
does."""

from __future__ import annotations

import copy
import json
import pathlib
from pathlib import Path
from typing import Any

import pytest
from workflow_builders import TEMPLATES, object_info

from airflow_comfy.workflow.api_format import convert_api
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.errors import WorkflowError
from airflow_comfy.workflow.graph import Link, Workflow
from airflow_comfy.workflow.loader import load_workflow, parse_workflow_text, workflow_format
from airflow_comfy.workflow.ui_format import convert_ui, count_ui_nodes, widget_layout, widget_values

TEMPLATE_FILES = sorted(p for p in TEMPLATES.glob("*.json") if not p.name.startswith("index"))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """Every node ComfyUI 0.3.64 declares, none of them runnable (the conversion only needs the interfaces)."""
    return Catalog({}).extended(object_info(), source="object_info-0.3.64")


def template(name: str) -> dict:
    return json.loads((TEMPLATES / name).read_text(encoding="utf-8"))


def load_template(name: str, catalog: Catalog) -> Workflow:
    return load_workflow(TEMPLATES / name, catalog)


# ------------------------------------------------------------------------------------------------------
# Small UI documents


def inp(name: str, type_: str, link: int | None = None, *, widget: bool = False) -> dict:
    entry: dict[str, Any] = {"name": name, "type": type_, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def out(name: str, type_: str) -> dict:
    return {"name": name, "type": type_, "links": []}


def node(node_id: int, type_: str, *, inputs: list | None = None, outputs: list | None = None,
         widgets: Any = None, mode: int = 0, pos: Any = (0, 0), size: Any = (100, 50), **extra: Any) -> dict:
    raw = {"id": node_id, "type": type_, "pos": list(pos) if isinstance(pos, tuple) else pos,
           "size": list(size) if isinstance(size, tuple) else size, "flags": {}, "order": 0, "mode": mode,
           "inputs": inputs or [], "outputs": outputs or [], "properties": {}}
    if widgets is not None:
        raw["widgets_values"] = widgets
    raw.update(extra)
    return raw


def ui_doc(nodes: list[dict], links: list[list], **extra: Any) -> dict:
    return {"last_node_id": 100, "last_link_id": 100, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4, **extra}


def txt2img_doc() -> dict:
    """The basic text-to-image graph: 4 checkpoint, 5 latent, 6/7 prompts, 3 sampler, 8 decode, 9 save."""
    return ui_doc(
        [
            node(4, "CheckpointLoaderSimple", widgets=["a.safetensors"],
                 outputs=[out("MODEL", "MODEL"), out("CLIP", "CLIP"), out("VAE", "VAE")]),
            node(5, "EmptyLatentImage", widgets=[512, 512, 1], outputs=[out("LATENT", "LATENT")]),
            node(6, "CLIPTextEncode", widgets=["pos"], inputs=[inp("clip", "CLIP", 1)],
                 outputs=[out("CONDITIONING", "CONDITIONING")]),
            node(7, "CLIPTextEncode", widgets=["neg"], inputs=[inp("clip", "CLIP", 2)],
                 outputs=[out("CONDITIONING", "CONDITIONING")]),
            node(3, "KSampler", widgets=[1, "fixed", 20, 8, "euler", "normal", 1],
                 inputs=[inp("model", "MODEL", 3), inp("positive", "CONDITIONING", 4),
                         inp("negative", "CONDITIONING", 5), inp("latent_image", "LATENT", 6)],
                 outputs=[out("LATENT", "LATENT")]),
            node(8, "VAEDecode", inputs=[inp("samples", "LATENT", 7), inp("vae", "VAE", 8)],
                 outputs=[out("IMAGE", "IMAGE")]),
            node(9, "SaveImage", widgets=["x"], inputs=[inp("images", "IMAGE", 9)]),
        ],
        [
            [1, 4, 1, 6, 0, "CLIP"], [2, 4, 1, 7, 0, "CLIP"], [3, 4, 0, 3, 0, "MODEL"],
            [4, 6, 0, 3, 1, "CONDITIONING"], [5, 7, 0, 3, 2, "CONDITIONING"], [6, 5, 0, 3, 3, "LATENT"],
            [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"],
        ],
    )


def find(doc: dict, node_id: int) -> dict:
    return next(n for n in doc["nodes"] if n["id"] == node_id)


def relink(doc: dict, link_id: int, origin: int, origin_slot: int) -> None:
    for link in doc["links"]:
        if link[0] == link_id:
            link[1], link[2] = origin, origin_slot


def convert(doc: dict, catalog: Catalog, source: str = "test.json") -> Workflow:
    return convert_ui(doc, catalog, name="test", source=source)


def problems_of(exc: pytest.ExceptionInfo[WorkflowError]) -> list[tuple[str, str | None, str | None, str | None]]:
    return [(p.kind, p.node_id, p.class_type, p.input_name) for p in exc.value.problems]


# ------------------------------------------------------------------------------------------------------
# The default template == ComfyUI's basic API example (its script_examples/basic_api_example.py)

BASIC_API_EXAMPLE = {
    "3": {"class_type": "KSampler",
          "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                     "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0],
                     "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode",
          "inputs": {"text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
                     "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_default_template_is_the_basic_api_example(catalog):
    workflow = load_template("default.json", catalog)
    api = workflow.to_api()
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == BASIC_API_EXAMPLE
    assert list(api) == ["3", "4", "5", "6", "7", "8", "9"]
    assert "control_after_generate" not in api["3"]["inputs"]
    assert find(template("default.json"), 9).get("widgets_values") is None  # SaveImage: frontend default
    assert workflow.name == "default" and workflow.format == "ui"
    assert workflow.source == str(TEMPLATES / "default.json")
    assert workflow.ui_workflow == template("default.json")
    assert workflow.nodes["3"].links()["model"] == Link("4", 0)
    assert api["4"]["_meta"] == {"title": "Load Checkpoint"}  # no title in the file: the display name
    raw = find(template("default.json"), 3)
    x, y = raw["pos"]
    w, h = raw["size"]
    assert workflow.nodes["3"].rect == (x, y - 30, w, h + 30)


def test_widget_values_ignore_extras_and_fill_defaults(catalog):
    ksampler = catalog.get("KSampler")
    assert widget_values(ksampler, [7, "randomize", 30]) == {
        "seed": 7, "steps": 30, "cfg": 8.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    assert widget_values(ksampler, None)["steps"] == 20
    assert widget_values(catalog.get("LoadImage"), ["a.png", "image", "", "junk"]) == {"image": "a.png"}
    assert widget_values(ksampler, {"seed": 3, "cfg": 2.5, "bogus": 1})["cfg"] == 2.5


# ------------------------------------------------------------------------------------------------------
# widgets_values layouts of common nodes (the frontend's widget order for ComfyUI 0.3.64's definitions),
# checked on the real templates

WORKED_EXAMPLES = {
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": ["add_noise", "noise_seed", None, "steps", "cfg", "sampler_name", "scheduler",
                         "start_at_step", "end_at_step", "return_with_leftover_noise"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "CLIPTextEncode": ["text"],
    "LoadImage": ["image", None],
    "LoadImageMask": ["image", "channel", None],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "ControlNetApplyAdvanced": ["strength", "start_percent", "end_percent"],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "LatentUpscale": ["upscale_method", "width", "height", "crop"],
}


@pytest.mark.parametrize("class_type", sorted(WORKED_EXAMPLES))
def test_widget_layout_of_common_nodes(catalog, class_type):
    assert widget_layout(catalog.get(class_type)) == WORKED_EXAMPLES[class_type]


@pytest.mark.parametrize("class_type", sorted(set(WORKED_EXAMPLES) - {"LoadImageMask"}))
def test_worked_examples_on_real_templates(catalog, class_type):
    """Every active top-level node of this class in the templates that convert: each widget value lands
    on the input the table names, unless a link feeds that input."""
    layout = WORKED_EXAMPLES[class_type]
    checked = 0
    for path in TEMPLATE_FILES:
        doc = json.loads(path.read_text(encoding="utf-8"))
        raws = [n for n in doc["nodes"] if n["type"] == class_type and n.get("mode", 0) == 0]
        if not raws:
            continue
        try:
            workflow = load_workflow(path, catalog)
        except WorkflowError:
            continue
        for raw in raws:
            values = raw.get("widgets_values") or []
            linked = {i["name"] for i in raw.get("inputs") or [] if i.get("link") is not None}
            emitted = workflow.nodes[str(raw["id"])].inputs
            for position, input_name in enumerate(layout):
                if input_name is None or input_name in linked or position >= len(values):
                    continue
                assert emitted[input_name] == values[position], (path.name, raw["id"], input_name)
                checked += 1
            assert not {"control_after_generate", "control_filter_list", "upload"} & set(emitted)
    assert checked or class_type == "PreviewImage"


def test_ksampler_advanced_with_primitive_nodes(catalog):
    """sdxl_refiner_prompt_example: steps/end_at_step come from PrimitiveNodes 45 and 47."""
    api = load_template("sdxl_refiner_prompt_example.json", catalog).to_api()
    base = api["10"]["inputs"]
    assert base["add_noise"] == "enable" and base["noise_seed"] == 6767725640732
    assert (base["steps"], base["cfg"], base["sampler_name"], base["scheduler"]) == (25, 8, "euler", "normal")
    assert (base["start_at_step"], base["end_at_step"], base["return_with_leftover_noise"]) == (0, 20, "enable")
    refiner = api["11"]["inputs"]
    assert (refiner["steps"], refiner["start_at_step"], refiner["end_at_step"]) == (25, 20, 10000)
    assert "45" not in api and "47" not in api


def test_load_image_upload_entry_and_lora_loader(catalog):
    api = load_template("image2image.json", catalog).to_api()
    load_images = [n for n in api.values() if n["class_type"] == "LoadImage"]
    assert load_images and all(set(n["inputs"]) == {"image"} for n in load_images)
    lora = load_template("lora.json", catalog).to_api()["11"]
    assert lora["class_type"] == "LoraLoader"
    assert {k: lora["inputs"][k] for k in ("lora_name", "strength_model", "strength_clip")} == {
        "lora_name": "blindbox_v1_mix.safetensors", "strength_model": 0.75, "strength_clip": 1}


def test_load_image_mask_upload_entry(catalog):
    doc = ui_doc([node(1, "LoadImageMask", widgets=["m.png", "red", "image"], outputs=[out("MASK", "MASK")])], [])
    assert convert(doc, catalog).nodes["1"].inputs == {"image": "m.png", "channel": "red"}


def test_dict_widgets_values(catalog):
    doc = txt2img_doc()
    find(doc, 3)["widgets_values"] = {"seed": 5, "steps": 7, "sampler_name": "dpmpp_2m"}
    inputs = convert(doc, catalog).nodes["3"].inputs
    assert (inputs["seed"], inputs["steps"], inputs["sampler_name"]) == (5, 7, "dpmpp_2m")
    assert (inputs["cfg"], inputs["scheduler"], inputs["denoise"]) == (8.0, "simple", 1.0)


def test_short_and_missing_widgets_values_take_frontend_defaults(catalog):
    doc = txt2img_doc()
    find(doc, 5)["widgets_values"] = [768]
    del find(doc, 9)["widgets_values"]
    workflow = convert(doc, catalog)
    assert workflow.nodes["5"].inputs == {"width": 768, "height": 512, "batch_size": 1}
    assert workflow.nodes["9"].inputs["filename_prefix"] == "ComfyUI"


def test_widget_converted_to_input_the_link_wins(catalog):
    doc = txt2img_doc()
    doc["nodes"].append(node(60, "PrimitiveInt", widgets=[42, "fixed"], outputs=[out("INT", "INT")]))
    find(doc, 3)["inputs"].append(inp("seed", "INT", 10, widget=True))
    doc["links"].append([10, 60, 0, 3, 4, "INT"])
    workflow = convert(doc, catalog)
    assert workflow.nodes["3"].inputs["seed"] == Link("60", 0)
    assert workflow.nodes["60"].inputs == {"value": 42}


def test_linked_widget_inputs_on_a_real_template(catalog):
    api = load_template("video_wan2_2_14B_s2v.json", catalog).to_api()
    assert api["3"]["inputs"]["steps"] == ["103", 0] and api["3"]["inputs"]["cfg"] == ["105", 0]


# ------------------------------------------------------------------------------------------------------
# Frontend-only nodes, muted and bypassed nodes


def test_primitive_node_value_becomes_the_constant_of_every_target(catalog):
    doc = txt2img_doc()
    primitive = node(50, "PrimitiveNode", widgets=[33, "fixed"],
                     outputs=[{"name": "INT", "type": "INT", "links": [11, 12], "widget": {"name": "steps"}}])
    doc["nodes"].append(primitive)
    find(doc, 3)["inputs"].append(inp("steps", "INT", 11, widget=True))
    find(doc, 5)["inputs"].append(inp("width", "INT", 12, widget=True))
    doc["links"] += [[11, 50, 0, 3, 4, "INT"], [12, 50, 0, 5, 0, "INT"]]
    workflow = convert(doc, catalog)
    assert workflow.nodes["3"].inputs["steps"] == 33
    assert workflow.nodes["5"].inputs["width"] == 33
    assert "50" not in workflow.nodes


def test_notes_are_never_emitted(catalog):
    doc = txt2img_doc()
    doc["nodes"] += [node(70, "Note", widgets=["hello"]), node(71, "MarkdownNote", widgets=["# hi"])]
    assert set(convert(doc, catalog).nodes) == {"3", "4", "5", "6", "7", "8", "9"}


def test_reroute_chains_are_followed(catalog):
    doc = txt2img_doc()
    doc["nodes"] += [
        node(40, "Reroute", inputs=[inp("", "*", 20)], outputs=[out("", "MODEL")]),
        node(41, "Reroute", inputs=[inp("", "*", 21)], outputs=[out("", "MODEL")]),
    ]
    doc["links"] += [[20, 4, 0, 40, 0, "*"], [21, 40, 0, 41, 0, "*"]]
    relink(doc, 3, 41, 0)
    workflow = convert(doc, catalog)
    assert workflow.nodes["3"].inputs["model"] == Link("4", 0)
    assert not {"40", "41"} & set(workflow.nodes)


def test_reroute_on_a_real_template(catalog):
    api = load_template("hidream_e1_1.json", catalog).to_api()
    assert api["49"]["inputs"]["model"] == ["55", 0] and api["53"]["inputs"]["model"] == ["55", 0]
    assert "48" not in api


def test_muted_node_is_not_emitted_and_its_links_are_dropped(catalog):
    doc = txt2img_doc()
    find(doc, 7)["mode"] = 2
    workflow = convert(doc, catalog)
    assert "7" not in workflow.nodes
    assert "negative" not in workflow.nodes["3"].inputs
    assert workflow.nodes["3"].inputs["positive"] == Link("6", 0)


def test_muted_node_feeding_a_widget_input_removes_the_input(catalog):
    doc = txt2img_doc()
    doc["nodes"].append(node(60, "PrimitiveInt", widgets=[42, "fixed"], mode=2, outputs=[out("INT", "INT")]))
    find(doc, 3)["inputs"].append(inp("seed", "INT", 10, widget=True))
    doc["links"].append([10, 60, 0, 3, 4, "INT"])
    assert "seed" not in convert(doc, catalog).nodes["3"].inputs


def _with_loras(doc: dict, modes: tuple[int, int]) -> dict:
    """4 -> LoraLoader 10 -> LoraLoader 11 -> (3.model, 6.clip)."""
    lora_io = {"outputs": [out("MODEL", "MODEL"), out("CLIP", "CLIP")]}
    doc["nodes"] += [
        node(10, "LoraLoader", widgets=["a.safetensors", 1, 1], mode=modes[0],
             inputs=[inp("model", "MODEL", 30), inp("clip", "CLIP", 31)], **lora_io),
        node(11, "LoraLoader", widgets=["b.safetensors", 1, 1], mode=modes[1],
             inputs=[inp("model", "MODEL", 32), inp("clip", "CLIP", 33)], **lora_io),
    ]
    doc["links"] += [[30, 4, 0, 10, 0, "MODEL"], [31, 4, 1, 10, 1, "CLIP"],
                     [32, 10, 0, 11, 0, "MODEL"], [33, 10, 1, 11, 1, "CLIP"]]
    relink(doc, 3, 11, 0)
    relink(doc, 1, 11, 1)
    return doc


def test_bypassed_chain_rewires_consumers_by_slot(catalog):
    workflow = convert(_with_loras(txt2img_doc(), (4, 4)), catalog)
    assert not {"10", "11"} & set(workflow.nodes)
    assert workflow.nodes["3"].inputs["model"] == Link("4", 0)
    assert workflow.nodes["6"].inputs["clip"] == Link("4", 1)
    one = convert(_with_loras(txt2img_doc(), (0, 4)), catalog)
    assert one.nodes["3"].inputs["model"] == Link("10", 0)
    assert one.nodes["6"].inputs["clip"] == Link("10", 1)
    assert one.nodes["10"].inputs["lora_name"] == "a.safetensors"


def test_bypass_type_rules(catalog):
    """Bypassed (and unknown: never emitted, so never looked up) node 20 with inputs
    [a: CLIP,VAE <- 4.VAE, b: IMAGE <- 30.IMAGE, c: LATENT <- 5.LATENT] and outputs [LATENT, IMAGE, MODEL, VAE]."""
    doc = ui_doc(
        [
            node(4, "CheckpointLoaderSimple", widgets=["a.safetensors"],
                 outputs=[out("MODEL", "MODEL"), out("CLIP", "CLIP"), out("VAE", "VAE")]),
            node(5, "EmptyLatentImage", widgets=[512, 512, 1], outputs=[out("LATENT", "LATENT")]),
            node(30, "LoadImage", widgets=["x.png", "image"], outputs=[out("IMAGE", "IMAGE"), out("MASK", "MASK")]),
            node(20, "SomeCustomPassThrough", mode=4,
                 inputs=[inp("a", "CLIP,VAE", 1), inp("b", "IMAGE", 2), inp("c", "LATENT", 3)],
                 outputs=[out("x", "LATENT"), out("y", "IMAGE"), out("z", "MODEL"), out("w", "VAE")]),
            node(8, "VAEDecode", inputs=[inp("samples", "LATENT", 4), inp("vae", "VAE", 5)],
                 outputs=[out("IMAGE", "IMAGE")]),
            node(9, "SaveImage", widgets=["x"], inputs=[inp("images", "IMAGE", 6)]),
            node(12, "ModelSamplingDiscrete", widgets=["eps", False], inputs=[inp("model", "MODEL", 7)],
                 outputs=[out("MODEL", "MODEL")]),
        ],
        [
            [1, 4, 2, 20, 0, "VAE"], [2, 30, 0, 20, 1, "IMAGE"], [3, 5, 0, 20, 2, "LATENT"],
            [4, 20, 0, 8, 0, "LATENT"], [5, 20, 3, 8, 1, "VAE"], [6, 20, 1, 9, 0, "IMAGE"],
            [7, 20, 2, 12, 0, "MODEL"],
        ],
    )
    workflow = convert(doc, catalog)
    assert "20" not in workflow.nodes
    assert workflow.nodes["8"].inputs["samples"] == Link("5", 0)  # exact type LATENT -> input c
    assert workflow.nodes["8"].inputs["vae"] == Link("4", 2)  # first compatible: a (CLIP,VAE)
    assert workflow.nodes["9"].inputs["images"] == Link("30", 0)  # same slot index, type fits
    assert "model" not in workflow.nodes["12"].inputs  # nothing fits: absent


# ------------------------------------------------------------------------------------------------------
# Subgraphs


def test_subgraphs_are_flattened_on_a_real_template(catalog):
    doc = template("flux1_dev_uso_reference_image_gen.json")
    workflow = load_template("flux1_dev_uso_reference_image_gen.json", catalog)
    api = workflow.to_api()
    # instance 57 (USO Reference Conditioning): guidance promoted from the instance's widgets_values
    assert api["57:35"]["class_type"] == "FluxGuidance"
    assert api["57:35"]["inputs"] == {"guidance": 3.5, "conditioning": ["57:41", 0]}
    assert api["57:44"]["inputs"] == {"conditioning": ["6", 0], "latent": ["51", 0]}
    assert api["57:41"]["inputs"]["reference_latents_method"] == "uxo/uno"
    assert api["31"]["inputs"]["positive"] == ["57:35", 0]  # instance output -> the inner node feeding -20
    # instance 55 (USOStyleReference): crop is an unlinked widget input promoted from widgets_values
    assert api["55:52"]["inputs"]["crop"] == "center"
    assert api["55:54"]["inputs"]["clip_vision_output"] == ["55:52", 0]
    # the bypassed instances 56, 83, 89 emit nothing; their consumers go through their MODEL input
    assert not [k for k in api if k.split(":")[0] in {"56", "83", "89"}]
    assert not {"55", "56", "57"} & set(api)
    instance = find(doc, 57)
    x, y = instance["pos"]
    assert workflow.nodes["57:35"].rect == (x, y - 30, instance["size"][0], instance["size"][1] + 30)


def test_subgraph_promoted_widgets_by_name(catalog):
    """video_wan2_2_14B_animate: instance 232's widgets_values map to the definition's widget-typed inputs
    (width, height, fps, seed, steps, cfg, sampler_name, scheduler); width/height/seed are linked."""
    doc = template("video_wan2_2_14B_animate.json")
    known = object_info()
    stubs = {}
    definitions = {d["id"] for d in doc["definitions"]["subgraphs"]}
    for raw in doc["nodes"]:
        if raw["type"] not in known and raw["type"] not in definitions and raw["type"] not in ("Note", "MarkdownNote"):
            stubs[raw["type"]] = {"input": {"required": {i["name"]: [i["type"]] for i in raw.get("inputs", [])}},
                                  "output": [o["type"] for o in raw.get("outputs", [])]}
    extended = catalog.extended(stubs, source="stubs")
    api = load_workflow(TEMPLATES / "video_wan2_2_14B_animate.json", extended).to_api()
    sampler = api["232:63"]["inputs"]
    assert sampler["seed"] == ["279", 0]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (6, 1, "euler", "simple")
    assert api["232:15"]["inputs"]["fps"] == 16
    assert api["242:86"]["inputs"]["image1"] == ["232:58", 0]
    assert api["242:90"]["inputs"]["width"] == api["242:90"]["inputs"]["height"]
    assert not [k for k in api if k.startswith("278:")]  # bypassed instance


def _nested_doc(outer_widgets: list) -> dict:
    """top: 4 checkpoint -> instance 2 (outer) -> 3 KSampler.model; outer holds instance 7 (inner); inner
    holds LoraLoaderModelOnly 1 whose model and strength_model come from the subgraph inputs."""
    inner = {
        "id": "inner-def", "name": "inner", "version": 1,
        "inputs": [{"id": "i0", "name": "model", "type": "MODEL", "linkIds": [1]},
                   {"id": "i1", "name": "strength", "type": "FLOAT", "linkIds": [2]}],
        "outputs": [{"id": "o0", "name": "MODEL", "type": "MODEL", "linkIds": [3]}],
        "nodes": [node(1, "LoraLoaderModelOnly", widgets=["x.safetensors", 0.5],
                       inputs=[inp("model", "MODEL", 1), inp("strength_model", "FLOAT", 2, widget=True)],
                       outputs=[out("MODEL", "MODEL")])],
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "MODEL"},
                  {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "FLOAT"},
                  {"id": 3, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}],
    }
    outer = {
        "id": "outer-def", "name": "outer", "version": 1,
        "inputs": [{"id": "j0", "name": "model", "type": "MODEL", "linkIds": [11]},
                   {"id": "j1", "name": "strength", "type": "FLOAT", "linkIds": [12]}],
        "outputs": [{"id": "p0", "name": "MODEL", "type": "MODEL", "linkIds": [13]}],
        "nodes": [node(7, "inner-def", inputs=[inp("model", "MODEL", 11), inp("strength", "FLOAT", 12, widget=True)],
                       outputs=[out("MODEL", "MODEL")])],
        "links": [{"id": 11, "origin_id": -10, "origin_slot": 0, "target_id": 7, "target_slot": 0, "type": "MODEL"},
                  {"id": 12, "origin_id": -10, "origin_slot": 1, "target_id": 7, "target_slot": 1, "type": "FLOAT"},
                  {"id": 13, "origin_id": 7, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}],
    }
    doc = txt2img_doc()
    doc["nodes"].append(node(2, "outer-def", widgets=outer_widgets, pos=(500, 600), size=(200, 80),
                             inputs=[inp("model", "MODEL", 21)], outputs=[out("MODEL", "MODEL")]))
    doc["links"].append([21, 4, 0, 2, 0, "MODEL"])
    relink(doc, 3, 2, 0)
    doc["definitions"] = {"subgraphs": [outer, inner]}
    return doc


def test_nested_subgraphs(catalog):
    workflow = convert(_nested_doc([0.8]), catalog)
    lora = workflow.nodes["2:7:1"]
    assert lora.class_type == "LoraLoaderModelOnly"
    assert lora.inputs == {"lora_name": "x.safetensors", "strength_model": 0.8, "model": Link("4", 0)}
    assert workflow.nodes["3"].inputs["model"] == Link("2:7:1", 0)
    assert lora.rect == (500.0, 570.0, 200.0, 110.0)
    assert not {"2", "2:7"} & set(workflow.nodes)
    # nothing promoted on the instance: the inner node keeps its own widget value
    assert convert(_nested_doc([]), catalog).nodes["2:7:1"].inputs["strength_model"] == 0.5
    assert count_ui_nodes(_nested_doc([])) == 7 + 1 + 1 + 1


def test_proxy_widgets_set_inner_widget_values(catalog):
    doc = _nested_doc([])
    doc["definitions"]["subgraphs"][1]["links"].pop(1)  # strength no longer comes from the subgraph input
    doc["definitions"]["subgraphs"][1]["nodes"][0]["inputs"].pop(1)
    doc["definitions"]["subgraphs"] = [doc["definitions"]["subgraphs"][1]]
    instance = find(doc, 2)
    instance["type"] = "inner-def"
    instance["widgets_values"] = [0.25]
    instance["properties"]["proxyWidgets"] = [["1", "strength_model"]]
    assert convert(doc, catalog).nodes["2:1"].inputs["strength_model"] == 0.25


def test_muted_or_bypassed_instance_emits_nothing_inside(catalog):
    for mode, expected in ((2, None), (4, Link("4", 0))):
        doc = _nested_doc([0.8])
        find(doc, 2)["mode"] = mode
        workflow = convert(doc, catalog)
        assert not [k for k in workflow.nodes if k.startswith("2:")]
        assert workflow.nodes["3"].inputs.get("model") == expected


# ------------------------------------------------------------------------------------------------------
# All the templates


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=[p.name for p in TEMPLATE_FILES])
def test_every_template_converts_or_names_its_unknown_nodes(catalog, path):
    try:
        workflow = load_workflow(path, catalog)
    except WorkflowError as exc:
        assert exc.problems and all(p.kind == "unknown_node_type" for p in exc.problems), str(exc)
        for problem in exc.problems:
            assert problem.file == str(path) and problem.node_id and problem.class_type
            assert problem.class_type not in catalog
            assert str(path) in str(problem) and problem.class_type in str(problem) and "--object-info" in str(problem)
        return
    api = json.loads(json.dumps(workflow.to_api()))
    assert api, path.name
    for node_id, entry in api.items():
        assert entry["class_type"] in catalog
        for input_name, value in entry["inputs"].items():
            assert input_name not in ("control_after_generate", "control_filter_list")
            if isinstance(value, list):
                origin, slot = value
                assert origin in api, (node_id, input_name, value)
                assert 0 <= slot < len(catalog.get(api[origin]["class_type"]).outputs), (node_id, input_name)
    assert convert_api(api, name="round-trip").to_api() == api


def test_how_many_templates_convert(catalog):
    converted = 0
    for path in TEMPLATE_FILES:
        try:
            load_workflow(path, catalog)
            converted += 1
        except WorkflowError:
            pass
    assert len(TEMPLATE_FILES) == 172
    assert converted == 171  # video_wan2_2_14B_animate needs custom node packs (DWPreprocessor, SAM2 ...)


def test_groups_are_read(catalog):
    doc = template("sdxl_simple_example.json")
    workflow = load_template("sdxl_simple_example.json", catalog)
    assert [(g.index, g.title, g.bounding) for g in workflow.groups] == [
        (i, g["title"], tuple(float(v) for v in g["bounding"])) for i, g in enumerate(doc["groups"])]


# ------------------------------------------------------------------------------------------------------
# Bad input


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_truncated_json(tmp_path, catalog):
    text = json.dumps(txt2img_doc(), indent=1)
    path = write(tmp_path, "cut.json", text[: len(text) // 2])
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog)
    assert exc.value.problems[0].kind == "invalid_json"
    assert str(path) in str(exc.value) and "line" in str(exc.value) and "column" in str(exc.value)


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "42", "null"])
def test_wrong_top_level_type(tmp_path, catalog, content):
    path = write(tmp_path, "wrong.json", content)
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog)
    assert exc.value.problems[0].kind == "not_a_workflow"
    assert str(path) in str(exc.value) and "JSON object" in str(exc.value)


def test_neither_ui_nor_api(tmp_path, catalog):
    path = write(tmp_path, "other.json", json.dumps({"hello": {"world": 1}}))
    with pytest.raises(WorkflowError, match="neither ComfyUI UI nor API format") as exc:
        load_workflow(path, catalog)
    assert exc.value.file == str(path)


def test_not_utf8(tmp_path, catalog):
    path = write(tmp_path, "latin.json", '{"nodes": [], "note": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog)
    assert exc.value.problems[0].kind == "invalid_encoding" and str(path) in str(exc.value)


def test_missing_file(tmp_path, catalog):
    with pytest.raises(WorkflowError) as exc:
        load_workflow(tmp_path / "nope.json", catalog)
    assert exc.value.problems[0].kind == "unreadable_file" and "nope.json" in str(exc.value)


def test_enormous_file_is_refused_without_reading_it(tmp_path, catalog, monkeypatch):
    path = tmp_path / "huge.json"
    with path.open("wb") as handle:
        handle.truncate(50_000_000)  # sparse: costs no disk

    def refuse(*args, **kwargs):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    monkeypatch.setattr(pathlib.Path, "read_bytes", refuse)
    monkeypatch.setattr(pathlib.Path, "read_text", refuse)
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog, max_bytes=1_000)
    assert exc.value.problems[0].kind == "too_large"
    assert str(path) in str(exc.value) and "1,000" in str(exc.value)


def test_small_limit_refuses_a_normal_file(tmp_path, catalog):
    path = write(tmp_path, "wf.json", json.dumps(txt2img_doc()))
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog, max_bytes=100)
    assert exc.value.problems[0].kind == "too_large"


def test_too_many_nodes_counts_subgraph_inner_nodes(tmp_path, catalog):
    path = write(tmp_path, "nested.json", json.dumps(_nested_doc([0.8])))
    assert load_workflow(path, catalog, max_nodes=10).nodes
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog, max_nodes=9)  # 8 top-level nodes, 10 once expanded
    assert exc.value.problems[0].kind == "too_many_nodes" and str(path) in str(exc.value)


def test_too_many_nodes_api(tmp_path, catalog):
    prompt = {str(i): {"class_type": "EmptyLatentImage", "inputs": {}} for i in range(30)}
    path = write(tmp_path, "api.json", json.dumps(prompt))
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog, max_nodes=20)
    assert exc.value.problems[0].kind == "too_many_nodes"


def test_link_to_a_missing_node(tmp_path, catalog):
    doc = txt2img_doc()
    relink(doc, 3, 99, 0)
    path = write(tmp_path, "broken.json", json.dumps(doc))
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog)
    assert problems_of(exc) == [("link_to_missing_node", "3", "KSampler", "model")]
    text = str(exc.value)
    assert str(path) in text and "node 3 (KSampler)" in text and "'model'" in text and "99" in text


def test_unknown_node_types_are_listed_together(tmp_path, catalog):
    doc = txt2img_doc()
    doc["nodes"] += [node(80, "FancyUpscaler", widgets=[2]), node(81, "OtherCustom"),
                     node(82, "BypassedCustom", mode=4), node(83, "MutedCustom", mode=2)]
    path = write(tmp_path, "custom.json", json.dumps(doc))
    with pytest.raises(WorkflowError) as exc:
        load_workflow(path, catalog)
    assert problems_of(exc) == [("unknown_node_type", "80", "FancyUpscaler", None),
                                ("unknown_node_type", "81", "OtherCustom", None)]
    for problem in exc.value.problems:
        assert problem.file == str(path)
        assert "unknown" in problem.message and "--object-info" in problem.message


def test_unknown_node_type_inside_a_subgraph(catalog):
    doc = _nested_doc([0.8])
    doc["definitions"]["subgraphs"][1]["nodes"][0]["type"] = "NotARealNode"
    with pytest.raises(WorkflowError) as exc:
        convert(doc, catalog)
    assert problems_of(exc) == [("unknown_node_type", "2:7:1", "NotARealNode", None)]


def test_output_slot_out_of_range(catalog):
    doc = txt2img_doc()
    relink(doc, 3, 4, 7)
    with pytest.raises(WorkflowError) as exc:
        convert(doc, catalog)
    assert problems_of(exc) == [("invalid_link_slot", "3", "KSampler", "model")]
    assert "test.json" in str(exc.value)


def test_structural_problems_are_collected(catalog):
    doc = txt2img_doc()
    find(doc, 5)["pos"] = ["left", 3]
    find(doc, 6)["inputs"][0]["link"] = 555  # no such link
    doc["nodes"].append("not a node")
    doc["links"].append(["junk"])
    with pytest.raises(WorkflowError) as exc:
        convert(doc, catalog)
    kinds = {p.kind for p in exc.value.problems}
    assert kinds == {"invalid_position", "missing_link", "invalid_node", "invalid_link"}
    assert all(p.file == "test.json" for p in exc.value.problems)
    position = next(p for p in exc.value.problems if p.kind == "invalid_position")
    assert (position.node_id, position.class_type) == ("5", "EmptyLatentImage")


def test_reroute_cycle_and_subgraph_cycle_are_problems(catalog):
    doc = txt2img_doc()
    doc["nodes"] += [node(40, "Reroute", inputs=[inp("", "*", 21)], outputs=[out("", "MODEL")]),
                     node(41, "Reroute", inputs=[inp("", "*", 20)], outputs=[out("", "MODEL")])]
    doc["links"] += [[20, 40, 0, 41, 0, "*"], [21, 41, 0, 40, 0, "*"]]
    relink(doc, 3, 41, 0)
    with pytest.raises(WorkflowError) as exc:
        convert(doc, catalog)
    assert problems_of(exc) == [("link_cycle", "3", "KSampler", "model")]

    doc = _nested_doc([0.8])
    doc["definitions"]["subgraphs"][0]["nodes"][0]["type"] = "outer-def"  # outer contains itself
    assert count_ui_nodes(doc) == 8 + 1
    with pytest.raises(WorkflowError) as exc:
        convert(doc, catalog)
    assert [p.kind for p in exc.value.problems] == ["subgraph_cycle"]


def _mutations(value: Any) -> list[Any]:
    return [None, "x", -1, 1.5, [], {}, [None, "x"], {"a": 1}, True]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _replaced(doc: dict, path: tuple, new: Any) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return doc


@pytest.mark.parametrize("which", ["txt2img", "nested"])
def test_malformed_documents_never_crash(catalog, which):
    """Every part of a document replaced by values of the wrong type: a Workflow or a WorkflowError,
    never a KeyError / TypeError / IndexError."""
    base = txt2img_doc() if which == "txt2img" else _nested_doc([0.8])
    for path in _paths(base):
        for new in _mutations(None):
            doc = _replaced(base, path, new)
            try:
                convert(doc, catalog)
            except WorkflowError as exc:
                assert all(p.file == "test.json" for p in exc.problems), (path, new)
            try:
                parse_workflow_text(json.dumps(doc), catalog, name="t", source="t.json")
            except WorkflowError as exc:
                assert exc.file == "t.json"


def test_garbage_ui_parts(catalog):
    for doc in (
        {"nodes": [1, None, "x", {}, {"id": 1}, {"type": "KSampler"}], "links": "nope"},
        {"nodes": [], "links": [[1, 2], {"id": "x"}, None], "groups": [{"bounding": "no"}, 3]},
        {"nodes": [], "definitions": {"subgraphs": [1, {"id": 5}, {"id": "s", "nodes": "x", "links": 3}]}},
        {"nodes": [node(1, "s", inputs=[inp("a", "MODEL", 1)])], "links": [[1, -10, 0, 1, 0, "MODEL"]],
         "definitions": "x"},
    ):
        with pytest.raises(WorkflowError):
            convert(doc, catalog)


# ------------------------------------------------------------------------------------------------------
# API format and format detection


def test_api_format(catalog, tmp_path):
    prompt = copy.deepcopy(BASIC_API_EXAMPLE)
    prompt["3"]["_meta"] = {"title": "My sampler"}
    prompt["9"]["inputs"]["extra"] = {"__value__": [1, 2]}
    workflow = convert_api(prompt, name="basic", source="basic.json")
    assert workflow.format == "api" and workflow.ui_workflow is None
    assert workflow.nodes["3"].inputs["model"] == Link("4", 0)
    assert workflow.nodes["3"].title == "My sampler"
    assert workflow.nodes["9"].inputs["extra"] == [1, 2]
    assert workflow.to_api()["9"]["inputs"]["extra"] == {"__value__": [1, 2]}
    path = write(tmp_path, "basic.json", json.dumps(prompt))
    assert load_workflow(path, catalog).to_api() == workflow.to_api()


def test_api_post_body_keeps_the_ui_workflow():
    body = {"client_id": "c", "prompt": BASIC_API_EXAMPLE,
            "extra_data": {"extra_pnginfo": {"workflow": {"nodes": [], "version": 0.4}}}}
    assert workflow_format(body) == "api"
    workflow = convert_api(body, name="body")
    assert set(workflow.nodes) == set(BASIC_API_EXAMPLE)
    assert workflow.ui_workflow == {"nodes": [], "version": 0.4}


def test_api_problems_name_the_node():
    prompt = copy.deepcopy(BASIC_API_EXAMPLE)
    del prompt["5"]["class_type"]
    prompt["6"]["inputs"] = ["not", "an", "object"]
    prompt["8"]["inputs"]["vae"] = ["44", 2]
    with pytest.raises(WorkflowError) as exc:
        convert_api(prompt, name="bad", source="bad.json")
    assert [(p.kind, p.node_id) for p in exc.value.problems] == [
        ("invalid_prompt", "5"), ("invalid_prompt", "6"), ("link_to_missing_node", "8")]
    assert "class_type" in exc.value.problems[0].message
    assert all(p.file == "bad.json" for p in exc.value.problems)


def test_workflow_format():
    assert workflow_format(txt2img_doc()) == "ui"
    assert workflow_format(BASIC_API_EXAMPLE) == "api"
    with pytest.raises(WorkflowError):
        workflow_format({"a": 1})
    with pytest.raises(WorkflowError):
        workflow_format({})


def test_ui_and_api_agree(catalog, tmp_path):
    ui = load_template("default.json", catalog)
    path = write(tmp_path, "default_api.json", json.dumps(ui.to_api()))
    api = load_workflow(path, catalog)
    assert {k: (n.class_type, n.inputs, n.title) for k, n in api.nodes.items()} == {
        k: (n.class_type, n.inputs, n.title) for k, n in ui.nodes.items()}
