"""The node catalog: the built-in declarations against ComfyUI 0.3.64's own ``/object_info``, and the catalog
machinery (object_info parsing, extension, widget rules, fingerprint, loading)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from workflow_builders import object_info

from airflow_comfy.workflow.catalog import (
    Catalog,
    InputSpec,
    NodeSpec,
    load_catalog,
    parse_object_info,
)
from airflow_comfy.workflow.core_nodes import (
    CORE_NODES,
    FILE_FOLDERS,
    SUPPORTED_SAMPLERS,
    SUPPORTED_SCHEDULERS,
)
from airflow_comfy.workflow.errors import WorkflowError

BUILTIN_NAMES = frozenset({
    "CheckpointLoaderSimple", "VAELoader", "LoraLoader", "CLIPSetLastLayer", "CLIPTextEncode",
    "ConditioningCombine", "ConditioningSetArea", "ControlNetLoader", "ControlNetApply",
    "ControlNetApplyAdvanced", "EmptyLatentImage", "LatentUpscale", "LatentUpscaleBy", "LatentFromBatch",
    "RepeatLatentBatch", "SetLatentNoiseMask", "KSampler", "KSamplerAdvanced", "VAEEncode",
    "VAEEncodeForInpaint", "VAEDecode", "LoadImage", "LoadImageMask", "ImageScale", "ImageScaleBy",
    "ImageScaleToTotalPixels", "ImageInvert", "ImageBatch", "ImagePadForOutpaint", "Canny",
    "UpscaleModelLoader", "ImageUpscaleWithModel", "SaveImage", "PreviewImage",
})

FILE_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoader", "lora_name"): "loras",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("LoadImage", "image"): "input",
    ("LoadImageMask", "image"): "input",
}
"""(class_type, input) -> the folder its file-name value is confined to."""

SAMPLING_COMBOS = {"sampler_name": SUPPORTED_SAMPLERS, "scheduler": SUPPORTED_SCHEDULERS}

# Options that only encode a V3 combo (its choices live under "options") or are prose, not interface facts.
NON_FACT_OPTIONS = {"tooltip"}
V3_COMBO_KEYS = {"options", "multiselect"}


@pytest.fixture(scope="module")
def reference() -> dict:
    """ComfyUI 0.3.64's own ``/object_info`` (tests/data): the declarations are checked against it."""
    return object_info()


@pytest.fixture(scope="module")
def builtin() -> Catalog:
    return Catalog.builtin()


def _ref_input(decl: list) -> tuple[str, dict, tuple | None]:
    """(type, options without prose, choices) of one raw ``/object_info`` input declaration, read
    independently of the package's parser."""
    kind = decl[0]
    options = {k: v for k, v in (decl[1] if len(decl) > 1 else {}).items() if k not in NON_FACT_OPTIONS}
    if isinstance(kind, list):
        return "COMBO", options, tuple(kind)
    if kind == "COMBO":
        choices = tuple(options["options"])
        return "COMBO", {k: v for k, v in options.items() if k not in V3_COMBO_KEYS}, choices
    return kind, options, None


def _widget_layout(spec: NodeSpec) -> list[str]:
    """The frontend's ``widgets_values`` layout for a node, from the catalog's widget rules
    (the ComfyUI frontend's: one widget per widget-typed input, in input_order, plus its extras)."""
    layout = []
    for inp in spec.widget_inputs:
        layout.append(inp.name)
        if inp.has_control_after_generate:
            layout.append("control_after_generate")
        if inp.has_control_filter:
            layout += ["control_after_generate", "control_filter_list"]
    if any(inp.has_upload_widget for inp in spec.inputs if inp.required):
        layout.append("upload")
    return layout


# --- the built-in declarations ---------------------------------------------------------------------


def test_builtin_catalog_holds_exactly_the_34_runnable_nodes(builtin):
    assert len(CORE_NODES) == 34
    assert set(builtin.class_types()) == BUILTIN_NAMES
    for class_type in BUILTIN_NAMES:
        spec = builtin.get(class_type)
        assert spec.runnable, class_type
        assert spec.source == "built-in"
    assert builtin.sources == ("built-in",)


@pytest.mark.parametrize("class_type", sorted(BUILTIN_NAMES))
def test_declaration_matches_comfyui(class_type, builtin, reference):
    spec = builtin.get(class_type)
    raw = reference[class_type]
    order = raw["input_order"]

    expected_layout = [(name, section == "required")
                       for section in ("required", "optional") for name in order.get(section, [])]
    assert [(inp.name, inp.required) for inp in spec.inputs] == expected_layout

    for inp in spec.inputs:
        section = "required" if inp.required else "optional"
        ref_type, ref_options, ref_choices = _ref_input(raw["input"][section][inp.name])
        where = f"{class_type}.{inp.name}"
        assert inp.type == ref_type, where
        assert dict(inp.options) == ref_options, where
        for key, value in ref_options.items():  # 8.0 must stay a float, 0 an int: they serialise differently
            assert type(inp.options[key]) is type(value), f"{where} option {key}"

        if (class_type, inp.name) in FILE_INPUTS:
            assert inp.type == "COMBO" and inp.choices is None, where
            assert inp.folder == FILE_INPUTS[class_type, inp.name], where
        elif inp.type == "COMBO" and inp.name in SAMPLING_COMBOS:
            assert inp.choices == SAMPLING_COMBOS[inp.name], where
            assert set(inp.choices) <= set(ref_choices), where
            positions = [ref_choices.index(choice) for choice in inp.choices]
            assert positions == sorted(positions), f"{where}: not in ComfyUI's order"
            assert inp.folder is None
        elif inp.type == "COMBO":
            assert inp.choices == ref_choices, where
            assert inp.folder is None, where
        else:
            assert inp.choices is None, where
            expected_folder = "output" if (class_type, inp.name) == ("SaveImage", "filename_prefix") else None
            assert inp.folder == expected_folder, where

    assert [(out.type, out.name, out.is_list) for out in spec.outputs] == list(
        zip(raw["output"], raw["output_name"], raw["output_is_list"], strict=True)
    )
    assert spec.output_node is raw["output_node"]
    assert spec.hidden == tuple(order.get("hidden", []))
    assert set(spec.hidden) == set(raw["input"].get("hidden", {}))
    assert spec.category == raw["category"]
    assert spec.display_name == (raw["display_name"] or class_type)


def test_every_file_input_is_declared_with_its_folder(builtin):
    folder_inputs = {
        (spec.class_type, inp.name): inp.folder
        for spec in CORE_NODES for inp in spec.inputs if inp.folder is not None
    }
    assert folder_inputs == {**FILE_INPUTS, ("SaveImage", "filename_prefix"): "output"}
    assert set(folder_inputs.values()) <= set(FILE_FOLDERS)
    # a COMBO without a fixed list must say where its files come from
    for spec in CORE_NODES:
        for inp in spec.inputs:
            if inp.type == "COMBO" and inp.choices is None:
                assert inp.folder, f"{spec.class_type}.{inp.name}"


def test_supported_samplers_and_schedulers_follow_comfyui_order(reference):
    assert set(SUPPORTED_SAMPLERS) == {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
                                       "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "ddim", "uni_pc", "uni_pc_bh2"}
    assert set(SUPPORTED_SCHEDULERS) == {"normal", "karras", "exponential", "simple", "sgm_uniform",
                                         "ddim_uniform", "beta"}
    ref_samplers = reference["KSampler"]["input"]["required"]["sampler_name"][0]
    ref_schedulers = reference["KSampler"]["input"]["required"]["scheduler"][0]
    assert list(SUPPORTED_SAMPLERS) == [name for name in ref_samplers if name in SUPPORTED_SAMPLERS]
    assert list(SUPPORTED_SCHEDULERS) == [name for name in ref_schedulers if name in SUPPORTED_SCHEDULERS]
    # the frontend's default is the first entry: the subset keeps ComfyUI's
    assert SUPPORTED_SAMPLERS[0] == ref_samplers[0] == "euler"
    assert SUPPORTED_SCHEDULERS[0] == ref_schedulers[0] == "simple"


def test_core_nodes_import_neither_torch_nor_airflow():
    code = (
        "import sys, airflow_comfy.workflow.core_nodes;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'airflow', 'numpy'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- parsing /object_info --------------------------------------------------------------------------


def test_parse_whole_reference(reference):
    specs = parse_object_info(reference, source="ref.json")
    assert len(specs) == len(reference) == 495
    assert not any(spec.runnable for spec in specs.values())
    assert {spec.source for spec in specs.values()} == {"ref.json"}
    ksampler = specs["KSampler"]
    assert [inp.name for inp in ksampler.inputs][:3] == ["model", "seed", "steps"]
    assert len(ksampler.input("sampler_name").choices) == 42
    assert ksampler.input("seed").options["max"] == 2**64 - 1
    assert specs["SaveImage"].hidden == ("prompt", "extra_pnginfo")
    assert specs["ControlNetApplyAdvanced"].input("vae").required is False
    assert [o.name for o in specs["ControlNetApplyAdvanced"].outputs] == ["positive", "negative"]


def test_parse_v1_and_v3_combo_encodings(reference):
    specs = parse_object_info(reference)
    v3 = specs["UpscaleModelLoader"].input("model_name")
    assert reference["UpscaleModelLoader"]["input"]["required"]["model_name"][0] == "COMBO"
    assert v3.type == "COMBO"
    assert v3.choices == ("RealESRGAN_x4plus.pth",)
    assert v3.is_widget
    v1 = specs["LoadImageMask"].input("channel")
    assert isinstance(reference["LoadImageMask"]["input"]["required"]["channel"][0], list)
    assert v1.type == "COMBO"
    assert v1.choices == ("alpha", "red", "green", "blue")
    v3_fixed = specs["ImageScaleToTotalPixels"].input("upscale_method")
    assert v3_fixed.choices == ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")

    synthetic = parse_object_info({
        "Custom": {
            "input": {"required": {
                "v1": [["a", "b"]],
                "v3": ["COMBO", {"options": ["p", "q"], "default": "q", "multiselect": False}],
                "v3_empty": ["COMBO", {}],
            }},
            "input_order": {"required": ["v3", "v1", "v3_empty"]},
            "output": [["x", "y"]],
        }
    })["Custom"]
    assert [inp.name for inp in synthetic.inputs] == ["v3", "v1", "v3_empty"]  # input_order wins
    assert synthetic.input("v1").choices == ("a", "b")
    assert synthetic.input("v3").choices == ("p", "q")
    assert synthetic.input("v3_empty").choices == ()
    assert synthetic.outputs[0].type == "COMBO"
    assert synthetic.display_name == "Custom"


def test_parse_rejects_non_object_documents():
    with pytest.raises(WorkflowError) as info:
        parse_object_info(["KSampler"], source="bad.json")
    assert info.value.file == "bad.json"
    with pytest.raises(WorkflowError) as info:
        parse_object_info({"Broken": "not a definition"}, source="bad.json")
    assert info.value.problems[0].class_type == "Broken"


def test_parse_rejects_malformed_definitions_naming_the_node():
    with pytest.raises(WorkflowError) as info:
        parse_object_info({"Broken": {"input": ["not", "a", "mapping"]}}, source="odd.json")
    problem = info.value.problems[0]
    assert (problem.file, problem.class_type, problem.kind) == ("odd.json", "Broken", "bad_object_info")


def test_extended_keeps_builtins_runnable_and_adds_the_rest(builtin, reference):
    extended = builtin.extended(reference, source="ref.json")
    assert len(extended) == 495
    assert extended.sources == ("built-in", "ref.json")
    for class_type in BUILTIN_NAMES:
        assert extended.get(class_type) is builtin.get(class_type)
        assert extended.get(class_type).runnable
    others = [extended.get(name) for name in extended.class_types() if name not in BUILTIN_NAMES]
    assert len(others) == 495 - 34
    assert all(not spec.runnable and spec.source == "ref.json" for spec in others)
    assert "SamplerCustom" in extended and "SamplerCustom" not in builtin
    assert len(builtin) == 34  # extending does not modify the original


def test_extended_later_files_replace_unrunnable_nodes_but_never_builtins(builtin):
    first = builtin.extended({"MyNode": {"input": {"required": {"x": ["INT", {"default": 1}]}}}}, "a.json")
    second = first.extended({
        "MyNode": {"input": {"required": {"x": ["INT", {"default": 2}]}}},
        "KSampler": {"input": {"required": {"only": ["INT"]}}, "output": []},
    }, "b.json")
    assert second.get("MyNode").input("x").frontend_default() == 2
    assert second.get("MyNode").source == "b.json"
    assert second.get("KSampler") is builtin.get("KSampler")


# --- widget rules (the ComfyUI frontend's) ----------------------------------------------------------


def test_is_widget(builtin, reference):
    ksampler = builtin.get("KSampler")
    assert [inp.name for inp in ksampler.widget_inputs] == [
        "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"
    ]
    assert not ksampler.input("model").is_widget
    assert not ksampler.input("latent_image").is_widget
    assert builtin.get("CheckpointLoaderSimple").input("ckpt_name").is_widget  # file combo
    assert builtin.get("SaveImage").input("filename_prefix").is_widget
    # forceInput turns a widget type into a socket (SaveLoRANode.steps is INT + forceInput in 0.3.64)
    steps = parse_object_info(reference)["SaveLoRANode"].input("steps")
    assert steps.type == "INT" and steps.options.get("forceInput") is True
    assert not steps.is_widget
    assert InputSpec("flag", "BOOLEAN").is_widget
    assert not InputSpec("anything", "*").is_widget


def test_control_after_generate(builtin, reference):
    assert builtin.get("KSampler").input("seed").has_control_after_generate
    assert builtin.get("KSamplerAdvanced").input("noise_seed").has_control_after_generate
    assert not builtin.get("KSampler").input("steps").has_control_after_generate
    assert not builtin.get("KSampler").input("sampler_name").has_control_after_generate
    assert not builtin.get("EmptyLatentImage").input("width").has_control_after_generate

    specs = parse_object_info(reference)
    # legacy rule: an INT named seed without the option still gets a control widget
    train_seed = specs["TrainLoraNode"].input("seed")
    assert "control_after_generate" not in train_seed.options
    assert train_seed.has_control_after_generate
    # the option on an INT with another name
    assert specs["PrimitiveInt"].input("value").has_control_after_generate
    # an explicit false wins over the name (frontend: `control_after_generate ?? name in [seed, noise_seed]`)
    moon_seed = specs["MoonvalleyVideo2VideoNode"].input("seed")
    assert moon_seed.options["control_after_generate"] is False
    assert not moon_seed.has_control_after_generate
    # a seed that is a socket only has no widget, so no control either
    assert not InputSpec("seed", "INT", options={"forceInput": True}).has_control_after_generate
    assert not InputSpec("seed", "FLOAT").has_control_after_generate

    combo_with_control = InputSpec("pick", "COMBO", options={"control_after_generate": True}, choices=("a",))
    assert combo_with_control.has_control_filter
    assert not combo_with_control.has_control_after_generate
    assert not builtin.get("KSampler").input("scheduler").has_control_filter


def test_upload_widget(builtin):
    assert builtin.get("LoadImage").input("image").has_upload_widget
    assert builtin.get("LoadImageMask").input("image").has_upload_widget
    assert not builtin.get("LoadImageMask").input("channel").has_upload_widget
    assert not builtin.get("CheckpointLoaderSimple").input("ckpt_name").has_upload_widget
    assert InputSpec("clip", "COMBO", options={"video_upload": True}).has_upload_widget


@pytest.mark.parametrize(("class_type", "layout"), [
    ("KSampler", ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"]),
    ("KSamplerAdvanced", ["add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                          "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"]),
    ("EmptyLatentImage", ["width", "height", "batch_size"]),
    ("CLIPTextEncode", ["text"]),
    ("LoadImage", ["image", "upload"]),
    ("LoadImageMask", ["image", "channel", "upload"]),
    ("SaveImage", ["filename_prefix"]),
    ("PreviewImage", []),
    ("LoraLoader", ["lora_name", "strength_model", "strength_clip"]),
    ("ControlNetApplyAdvanced", ["strength", "start_percent", "end_percent"]),
    ("ImageScale", ["upscale_method", "width", "height", "crop"]),
    ("LatentUpscale", ["upscale_method", "width", "height", "crop"]),
])
def test_widgets_values_layout_of_common_nodes(builtin, class_type, layout):
    assert _widget_layout(builtin.get(class_type)) == layout


def test_frontend_default(builtin):
    ksampler = builtin.get("KSampler")
    assert ksampler.input("seed").frontend_default() == 0
    assert ksampler.input("steps").frontend_default() == 20
    assert ksampler.input("cfg").frontend_default() == 8.0
    assert ksampler.input("denoise").frontend_default() == 1.0
    assert ksampler.input("sampler_name").frontend_default() == "euler"  # no default: first choice
    assert ksampler.input("scheduler").frontend_default() == "simple"
    assert builtin.get("KSamplerAdvanced").input("end_at_step").frontend_default() == 10000
    assert builtin.get("CLIPTextEncode").input("text").frontend_default() == ""  # STRING without default
    assert builtin.get("SaveImage").input("filename_prefix").frontend_default() == "ComfyUI"
    assert builtin.get("LoadImageMask").input("channel").frontend_default() == "alpha"
    assert builtin.get("CLIPSetLastLayer").input("stop_at_clip_layer").frontend_default() == -1
    assert builtin.get("CheckpointLoaderSimple").input("ckpt_name").frontend_default() is None  # file list

    assert InputSpec("n", "INT").frontend_default() == 0
    zero = InputSpec("f", "FLOAT").frontend_default()
    assert zero == 0.0 and isinstance(zero, float)
    assert InputSpec("b", "BOOLEAN").frontend_default() is False
    assert InputSpec("c", "COMBO", options={"default": "q"}, choices=("p", "q")).frontend_default() == "q"
    assert InputSpec("m", "MODEL").frontend_default() is None


# --- recipe nodes, fingerprint, loading ------------------------------------------------------------


@pytest.mark.parametrize(("class_type", "expected"), [
    ("CheckpointLoaderSimple", True),
    ("LoraLoader", True),
    ("VAELoader", True),
    ("ControlNetLoader", True),
    ("UpscaleModelLoader", True),
    ("CLIPSetLastLayer", True),
    ("KSampler", False),
    ("LoadImage", False),
    ("SaveImage", False),
    ("PreviewImage", False),
    ("ControlNetApplyAdvanced", False),
    ("CLIPTextEncode", False),
])
def test_produces_only_unserializable(builtin, class_type, expected):
    assert builtin.get(class_type).produces_only_unserializable is expected


def test_fingerprint_is_stable_and_tracks_declarations(builtin, reference):
    fingerprint = builtin.fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert Catalog.builtin().fingerprint() == fingerprint

    extended = builtin.extended(reference, source="ref.json")
    assert extended.fingerprint() != fingerprint
    assert builtin.extended(reference, source="ref.json").fingerprint() == extended.fingerprint()

    def custom(default: int) -> Catalog:
        info = {"MyNode": {"input": {"required": {"x": ["INT", {"default": default}]}}}}
        return builtin.extended(info, "c")

    assert custom(1).fingerprint() == custom(1).fingerprint()
    assert custom(1).fingerprint() != custom(2).fingerprint()
    # an object_info that only restates built-in nodes changes nothing the runner uses
    restated = builtin.extended({"KSampler": reference["KSampler"]}, "ref.json")
    assert restated.fingerprint() == fingerprint


def test_load_catalog_without_files_is_the_builtin_catalog(builtin):
    catalog = load_catalog()
    assert catalog.class_types() == builtin.class_types()
    assert catalog.fingerprint() == builtin.fingerprint()


def test_load_catalog_extends_with_each_file_in_order(tmp_path):
    first = tmp_path / "first.json"
    second = tmp_path / "second.json"
    first.write_text(json.dumps({"A": {"input": {"required": {"x": ["INT", {"default": 1}]}}}}))
    second.write_text(json.dumps({"A": {"input": {"required": {"x": ["INT", {"default": 2}]}}},
                                  "B": {"input": {}}}))
    catalog = load_catalog([first, str(second)])
    assert catalog.sources == ("built-in", str(first), str(second))
    assert len(catalog) == 36
    assert catalog.get("A").input("x").frontend_default() == 2
    assert catalog.get("A").source == str(second)
    assert not catalog.get("B").runnable


@pytest.mark.parametrize("content", [None, "{not json", "", b"\xff\xfe\x00garbage", "[1, 2]",
                                     '{"X": {"input": {"required": [1]}}}'])
def test_load_catalog_bad_file_names_the_file(tmp_path, content):
    path = tmp_path / "object_info.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(WorkflowError) as info:
        load_catalog([path])
    assert info.value.file == str(path)
    assert str(path) in str(info.value)
    assert info.value.problems[0].kind == "bad_object_info"
