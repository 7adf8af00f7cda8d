"""API ("prompt") documents -> the canonical :class:`~airflow_comfy.workflow.graph.Workflow`.

The API format is what ComfyUI's backend executes: ``{node_id: {"class_type", "inputs", "_meta"?}}``, where an
input value ``["<node id>", <output index>]`` is a link and ``{"__value__": [...]}`` wraps a literal list.
The body of a ``POST /prompt`` request (``{"prompt": {...}, "extra_data": {...}}``) is accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_comfy.workflow.errors import ProblemCollector
from airflow_comfy.workflow.graph import Link, Node, Workflow, is_api_link, sorted_node_ids


def convert_api(doc: dict, *, name: str, source: str | None = None, external: frozenset[str] = frozenset(),
                ) -> Workflow:
    """Convert an API-format prompt (or a POST /prompt body) into the canonical graph. Raises one
    :class:`~airflow_comfy.workflow.errors.WorkflowError` listing every malformed node. ``external``: node ids
    that links may name although they are not in ``doc`` (a group's boundary inputs)."""
    problems = ProblemCollector(source)
    prompt, ui_workflow = unwrap_prompt(doc)
    if not isinstance(prompt, Mapping) or not prompt:
        problems.add("the API prompt must be a non-empty JSON object of node id -> node", "invalid_prompt")
        problems.raise_if_any()
    nodes: dict[str, Node] = {}
    for node_id, raw in prompt.items():
        node = _node(str(node_id), raw, problems)
        if node is not None:
            nodes[node.id] = node
    _check_link_targets(nodes, {str(node_id) for node_id in prompt} | set(external), problems)
    problems.raise_if_any()
    ordered = {node_id: nodes[node_id] for node_id in sorted_node_ids(nodes)}
    return Workflow(name=name, nodes=ordered, source=source, format="api", ui_workflow=ui_workflow)


def unwrap_prompt(doc: Mapping[str, Any]) -> tuple[Any, dict | None]:
    """``(prompt, ui_workflow)``: the prompt itself, or the one inside a POST /prompt body together with the
    UI workflow it carries in ``extra_data.extra_pnginfo.workflow``."""
    if is_post_body(doc):
        extra = doc.get("extra_data")
        pnginfo = extra.get("extra_pnginfo") if isinstance(extra, Mapping) else None
        workflow = pnginfo.get("workflow") if isinstance(pnginfo, Mapping) else None
        return doc["prompt"], workflow if isinstance(workflow, dict) else None
    return doc, None


def is_post_body(doc: Any) -> bool:
    """A POST /prompt body: ``{"prompt": {node id: node, ...}, ...}`` (not a node whose id is "prompt")."""
    if not isinstance(doc, Mapping):
        return False
    prompt = doc.get("prompt")
    return isinstance(prompt, Mapping) and "class_type" not in prompt and "inputs" not in prompt


def is_api_prompt(doc: Any) -> bool:
    """An object of node objects, at least one of which names its ``class_type``."""
    if not isinstance(doc, Mapping) or not doc or "nodes" in doc:
        return False
    return any(isinstance(node, Mapping) and "class_type" in node for node in doc.values())


def _node(node_id: str, raw: Any, problems: ProblemCollector) -> Node | None:
    if not isinstance(raw, Mapping):
        problems.add(f"a node must be a JSON object, not {type(raw).__name__}", "invalid_prompt",
                     node_id=node_id)
        return None
    class_type = raw.get("class_type")
    if not isinstance(class_type, str) or not class_type:
        problems.add("Cannot execute because a node is missing the class_type property", "invalid_prompt",
                     node_id=node_id)
        return None
    raw_inputs = raw.get("inputs", {})
    if not isinstance(raw_inputs, Mapping):
        problems.add("'inputs' must be a JSON object of input name -> value", "invalid_prompt",
                     node_id=node_id, class_type=class_type)
        return None
    inputs = {}
    for input_name, value in raw_inputs.items():
        inputs[str(input_name)] = _input_value(value, problems, node_id, class_type, str(input_name))
    return Node(id=node_id, class_type=class_type, inputs=inputs, title=_title(raw))


def _input_value(value: Any, problems: ProblemCollector, node_id: str, class_type: str, input_name: str) -> Any:
    if is_api_link(value):
        output = value[1]
        if (isinstance(output, float) and not output.is_integer()) or output < 0:
            problems.add(f"bad linked input {value!r}: the output index must be a whole number >= 0",
                         "bad_linked_input", node_id=node_id, class_type=class_type, input_name=input_name)
            return value
        return Link(value[0], int(output))
    if isinstance(value, Mapping) and set(value) == {"__value__"} and isinstance(value["__value__"], list):
        return list(value["__value__"])
    return value


def _title(raw: Mapping[str, Any]) -> str | None:
    meta = raw.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    return title if isinstance(title, str) else None


def _check_link_targets(nodes: dict[str, Node], prompt_ids: set[str], problems: ProblemCollector) -> None:
    """Links to node ids absent from the prompt (a node that is present but malformed is reported once)."""
    for node_id in sorted_node_ids(nodes):
        node = nodes[node_id]
        for input_name, link in node.links().items():
            if link.node not in prompt_ids:
                problems.add(f"linked to node {link.node}, which is not in the prompt", "link_to_missing_node",
                             node_id=node_id, class_type=node.class_type, input_name=input_name)
