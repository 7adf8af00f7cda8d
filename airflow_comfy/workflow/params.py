"""Trigger params: which node inputs a person can set when triggering a run, with type, bounds and titles.

Pure data here (JSON-schema-like); the factory turns each :class:`ParamDef` into an ``airflow.sdk.Param``.
A param overrides its node inputs for that run only.

Discovered by default (constants only; an input fed by a link is not a param):

* ``CLIPTextEncode.text`` -> ``prompt`` / ``negative_prompt`` when it feeds a sampler's positive / negative
  conditioning, else ``text``;
* ``KSampler`` seed, steps, cfg, denoise; ``KSamplerAdvanced`` noise_seed (as ``seed``), steps, cfg;
* ``LoadImage.image`` / ``LoadImageMask.image`` -> ``image``;
* ``EmptyLatentImage`` width, height, batch_size.

When a name would be used by more than one node, each gets the node id as a suffix (``seed_3``, ``seed_10``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_comfy.workflow.catalog import Catalog, InputSpec
from airflow_comfy.workflow.errors import Problem, WorkflowError
from airflow_comfy.workflow.graph import Link, Workflow, sorted_node_ids
from airflow_comfy.workflow.groupspec import ParamBinding
from airflow_comfy.workflow.inputs import IMAGE_TYPES, INPUT_IMAGE_FORMAT

DEFAULT_PARAM_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    # class_type: ((input name, param name), ...)
    "CLIPTextEncode": (("text", "text"),),
    "KSampler": (("seed", "seed"), ("steps", "steps"), ("cfg", "cfg"), ("denoise", "denoise")),
    "KSamplerAdvanced": (("noise_seed", "seed"), ("steps", "steps"), ("cfg", "cfg")),
    "LoadImage": (("image", "image"),),
    "LoadImageMask": (("image", "mask_image"),),
    "EmptyLatentImage": (("width", "width"), ("height", "height"), ("batch_size", "batch_size")),
}

#: Offered only when the sidecar's ``auto_params`` lists them: class_type -> ((input name, param name), ...).
#: Their choices are the catalog's, which for these nodes are what the runner implements.
OPTIONAL_PARAM_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "KSampler": (("sampler_name", "sampler"), ("scheduler", "scheduler")),
    "KSamplerAdvanced": (("sampler_name", "sampler"), ("scheduler", "scheduler")),
}
#: The names ``auto_params`` may list: the automatic ones (offered anyway) and the optional ones.
AUTO_PARAM_NAMES: tuple[str, ...] = (
    "prompt", "negative_prompt", "text",
    *dict.fromkeys(name for pairs in DEFAULT_PARAM_INPUTS.values() for _, name in pairs if name != "text"),
    *dict.fromkeys(name for pairs in OPTIONAL_PARAM_INPUTS.values() for _, name in pairs),
)

_PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A model file name that stays inside its folder: not absolute, no '..' segment (checked again by the runner).
# Input images are checked by the format INPUT_IMAGE_FORMAT instead, whose refusals are sentences.
SAFE_FILE_NAME_PATTERN = r"^(?![/\\])(?![A-Za-z]:)(?!.*(^|[/\\])\.\.([/\\]|$)).+$"

_TITLES = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "text": "Text", "seed": "Seed", "steps": "Steps",
    "cfg": "CFG scale", "denoise": "Denoise", "image": "Input image", "mask_image": "Mask image",
    "width": "Width", "height": "Height", "batch_size": "Batch size", "sampler": "Sampler", "scheduler": "Scheduler",
}


@dataclass
class ParamDef:
    name: str
    title: str
    description: str
    schema: dict[str, Any]
    """JSON-schema of the value: type, minimum/maximum, enum, format, pattern."""
    default: Any
    bindings: list[ParamBinding] = field(default_factory=list)


def discover_params(workflow: Workflow, catalog: Catalog, *, auto: bool | Sequence[str] = True,
                    declared: Mapping[str, Any] | None = None) -> list[ParamDef]:
    """The workflow's trigger params: the automatic set (unless ``auto`` is false; a list of names adds the
    optional ones it names, ``sampler`` and ``scheduler``) plus the sidecar's ``params`` (``{name:
    "node.input"}`` or ``{name: {node, input, title?, description?}}``), which win on name clashes."""
    found: dict[str, ParamDef] = {}
    if auto is not False:
        optional = frozenset(auto) if not isinstance(auto, bool) else frozenset()
        candidates = _automatic_candidates(workflow, catalog, optional)
        counts: dict[str, int] = {}
        for base, _, _ in candidates:
            counts[base] = counts.get(base, 0) + 1
        for base, node_id, input_name in candidates:
            name = base if counts[base] == 1 else f"{base}_{node_id.replace(':', '_')}"
            found[name] = _make_param(workflow, catalog, name, node_id, input_name)
    for name, decl in (declared or {}).items():
        found[name] = _declared_param(workflow, catalog, name, decl)
    return [found[name] for name in found]


def bindings(params: list[ParamDef]) -> dict[str, list[ParamBinding]]:
    return {p.name: list(p.bindings) for p in params}


def _automatic_candidates(workflow: Workflow, catalog: Catalog,
                          optional: frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
    roles = _conditioning_roles(workflow, catalog)
    out = []
    for node_id in sorted_node_ids(workflow.nodes):
        node = workflow.nodes[node_id]
        chosen = [pair for pair in OPTIONAL_PARAM_INPUTS.get(node.class_type, ()) if pair[1] in optional]
        for input_name, base in (*DEFAULT_PARAM_INPUTS.get(node.class_type, ()), *chosen):
            if input_name not in node.inputs or isinstance(node.inputs[input_name], Link):
                continue
            if node.class_type == "CLIPTextEncode":
                base = {"positive": "prompt", "negative": "negative_prompt"}.get(roles.get(node_id, ""), "text")
            out.append((base, node_id, input_name))
    return out


def _conditioning_roles(workflow: Workflow, catalog: Catalog) -> dict[str, str]:
    """node id -> 'positive' / 'negative' when every sampler input its conditioning reaches has that name."""
    consumers = workflow.consumers()
    roles: dict[str, set[str]] = {}
    for node_id in workflow.nodes:
        if workflow.nodes[node_id].class_type != "CLIPTextEncode":
            continue
        # Walk (node, output index) pairs; None means "any output".
        seen: set[tuple[str, int | None]] = set()
        stack: list[tuple[str, int | None]] = [(node_id, None)]
        reached: set[str] = set()
        while stack:
            current, output = stack.pop()
            for consumer, input_name, link in consumers.get(current, ()):
                if output is not None and link.output != output:
                    continue
                spec = catalog.get(workflow.nodes[consumer].class_type)
                if spec is None:
                    continue
                if spec.category == "sampling" and input_name in ("positive", "negative"):
                    reached.add(input_name)
                    continue
                # A node with an output named like the input we came in through (ControlNetApplyAdvanced's
                # positive -> positive) carries the role on that output only.
                same_named = [i for i, out in enumerate(spec.outputs) if out.name == input_name]
                step = (consumer, same_named[0] if same_named else None)
                if step not in seen:
                    seen.add(step)
                    stack.append(step)
        roles[node_id] = reached
    return {nid: next(iter(r)) for nid, r in roles.items() if len(r) == 1}


def _make_param(workflow: Workflow, catalog: Catalog, name: str, node_id: str, input_name: str,
                title: str | None = None, description: str | None = None) -> ParamDef:
    node = workflow.nodes[node_id]
    spec = catalog.get(node.class_type).input(input_name)
    node_label = f"{node.class_type} node {node_id}" + (f" ({node.title!r})" if node.title and node.title != node.class_type else "")
    return ParamDef(
        name=name,
        title=title or _default_title(name, node_id),
        description=description or f"Sets input '{input_name}' of {node_label} for this run." + (
            _IMAGE_HELP if spec.folder == "input" else ""),
        schema=_schema(spec),
        default=node.inputs[input_name],
        bindings=[ParamBinding(node_id, input_name)],
    )


_IMAGE_HELP = (f" A file name in the input folder, a file:// URI of a file inside it, or an s3:// URI in the input "
               f"store ({', '.join(IMAGE_TYPES)}).")


def _default_title(name: str, node_id: str) -> str:
    base, _, suffix = name.partition("_")
    if name in _TITLES:
        return _TITLES[name]
    for known, title in _TITLES.items():
        if name.startswith(known + "_"):
            return f"{title} (node {node_id})"
    return name.replace("_", " ").capitalize() if not suffix else f"{base.capitalize()} {suffix}"


def _schema(spec: InputSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    if spec.type == "INT":
        schema["type"] = "integer"
    elif spec.type == "FLOAT":
        schema["type"] = "number"
    elif spec.type == "BOOLEAN":
        schema["type"] = "boolean"
    else:
        schema["type"] = "string"
    for key, target in (("min", "minimum"), ("max", "maximum")):
        if key in spec.options and spec.type in ("INT", "FLOAT"):
            schema[target] = spec.options[key]
    if spec.type == "COMBO" and spec.choices is not None:
        schema["enum"] = list(spec.choices)
    if spec.options.get("multiline"):
        schema["format"] = "multiline"
    if spec.folder == "input":
        schema["format"] = INPUT_IMAGE_FORMAT
        schema["minLength"] = 1
    elif spec.folder:
        schema["pattern"] = SAFE_FILE_NAME_PATTERN
        schema["minLength"] = 1
    return schema


def _declared_param(workflow: Workflow, catalog: Catalog, name: str, decl: Any) -> ParamDef:
    where = {"file": workflow.source}
    if not _PARAM_NAME_RE.match(str(name)):
        raise WorkflowError(Problem(f"sidecar param name {name!r} must be a Python-style identifier",
                                    "bad_sidecar", **where))
    if isinstance(decl, str):
        decl = {"input": decl}
    if not isinstance(decl, Mapping):
        raise WorkflowError(Problem(f"sidecar param {name!r} must be 'node.input' or a mapping", "bad_sidecar", **where))
    target = str(decl.get("input", ""))
    node_id = str(decl["node"]) if "node" in decl else target.rpartition(".")[0]
    input_name = target.rpartition(".")[2] if "node" not in decl else target
    node = workflow.nodes.get(node_id)
    if node is None:
        raise WorkflowError(Problem(f"sidecar param {name!r} names node {node_id!r}, which is not among the "
                                    "nodes that run", "bad_sidecar", node_id=node_id, **where))
    spec = catalog.get(node.class_type).input(input_name)
    if spec is None or spec.type not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
        raise WorkflowError(Problem(f"sidecar param {name!r}: {node.class_type} has no widget input "
                                    f"{input_name!r}", "bad_sidecar", node_id=node_id,
                                    class_type=node.class_type, input_name=input_name, **where))
    if input_name not in node.inputs or isinstance(node.inputs[input_name], Link):
        raise WorkflowError(Problem(f"sidecar param {name!r}: the input is fed by a link, not a value",
                                    "bad_sidecar", node_id=node_id, class_type=node.class_type,
                                    input_name=input_name, **where))
    return _make_param(workflow, catalog, name, node_id, input_name, decl.get("title"), decl.get("description"))
