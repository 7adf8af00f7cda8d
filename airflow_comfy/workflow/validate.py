"""Validation with ComfyUI's rules (``execution.py`` ``validate_prompt``, ``validate_inputs``), pruning, and
the runnable-node check.

``validate(workflow, catalog)`` returns the workflow pruned to what ComfyUI would execute (the ancestors of
its output nodes) with constants coerced to their declared types, or raises one :class:`WorkflowError`
carrying every problem found. Every problem names the file, node id, class type and input.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from airflow_comfy.workflow.catalog import Catalog, InputSpec, NodeSpec
from airflow_comfy.workflow.errors import Problem, ProblemCollector, WorkflowError
from airflow_comfy.workflow.graph import Link, Node, Workflow, sorted_node_ids
from airflow_comfy.workflow.inputs import folder_name_problem

# LoadImage accepts "name.png [input]" style annotations selecting the base folder
# (ComfyUI's ``folder_paths.get_annotated_filepath``).
_ANNOTATIONS = (" [input]", " [output]", " [temp]")


def validate(workflow: Workflow, catalog: Catalog, *, require_runnable: bool = True) -> Workflow:
    """Check ``workflow`` as ComfyUI's ``validate_prompt`` would, plus what a pod needs: every node that will
    run must be runnable by airflow-comfy's runner (``require_runnable``), and file names stay in their
    folders. Returns the pruned, coerced workflow."""
    where = workflow.source or workflow.name
    _check_known_types(workflow, catalog, where)
    outputs = output_node_ids(workflow, catalog)
    if not outputs:
        raise WorkflowError(Problem(
            "workflow has no output node (SaveImage, PreviewImage, ...): nothing would run",
            "prompt_no_outputs", file=where))
    problems = ProblemCollector(where)
    kept = _ancestors(workflow, outputs, problems)
    problems.raise_if_any()
    if require_runnable:
        _check_runnable(workflow, kept, catalog, where)
    nodes = {}
    for node_id in sorted_node_ids(kept):
        node = workflow.nodes[node_id]
        nodes[node_id] = _validate_node(node, catalog.get(node.class_type), workflow, catalog, problems)
    problems.raise_if_any()
    _check_acyclic(nodes, where)
    return replace(workflow, nodes=nodes)


def check_node_constants(node: Node, catalog: Catalog, *, file: str | None = None) -> Node:
    """Validate and coerce one node's constant inputs (types, bounds, choices, file names): what the runner
    re-checks after trigger params were applied. Raises :class:`WorkflowError`."""
    spec = catalog.get(node.class_type)
    if spec is None:
        raise WorkflowError(Problem(f"node type {node.class_type!r} is not in the node catalog",
                                    "unknown_node_type", file=file, node_id=node.id, class_type=node.class_type))
    problems = ProblemCollector(file)
    where = {"node_id": node.id, "class_type": node.class_type}
    inputs = dict(node.inputs)
    for input_spec in spec.inputs:
        value = node.inputs.get(input_spec.name)
        if input_spec.name in node.inputs and not isinstance(value, Link) and input_spec.type in _WIDGET_KINDS:
            inputs[input_spec.name] = _check_constant(value, input_spec, problems, where)
    problems.raise_if_any()
    return replace(node, inputs=inputs)


_WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def output_node_ids(workflow: Workflow, catalog: Catalog) -> list[str]:
    return [nid for nid in sorted_node_ids(workflow.nodes)
            if (spec := catalog.get(workflow.nodes[nid].class_type)) is not None and spec.output_node]


def _check_known_types(workflow: Workflow, catalog: Catalog, where: str) -> None:
    unknown = [node for node in workflow.nodes.values() if node.class_type not in catalog]
    if unknown:
        raise WorkflowError([
            Problem(f"node type {node.class_type!r} does not exist in the node catalog (add the ComfyUI "
                    "/object_info that defines it with --object-info or [comfy] object_info_files)",
                    "unknown_node_type", file=where, node_id=node.id, class_type=node.class_type)
            for node in sorted(unknown, key=lambda n: sorted_node_ids([n.id])[0])
        ])


def _ancestors(workflow: Workflow, outputs: list[str], problems: ProblemCollector) -> set[str]:
    """Nodes upstream of the outputs (outputs included): the only ones ComfyUI executes."""
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        node = workflow.nodes[node_id]
        for name, link in node.links().items():
            if link.node not in workflow.nodes:
                problems.add(f"linked to node {link.node!r}, which is not in the workflow", "bad_linked_input",
                             node_id=node_id, class_type=node.class_type, input_name=name)
            else:
                stack.append(link.node)
    return seen


def _check_runnable(workflow: Workflow, kept: set[str], catalog: Catalog, where: str) -> None:
    missing: dict[str, list[str]] = {}
    for node_id in sorted_node_ids(kept):
        node = workflow.nodes[node_id]
        if not catalog.get(node.class_type).runnable:
            missing.setdefault(node.class_type, []).append(node_id)
    if not missing:
        return
    raise WorkflowError([
        Problem("node type is known (from an object_info file) but airflow-comfy's runner cannot execute it",
                "unsupported_node_type", file=where, node_id=node_id, class_type=class_type)
        for class_type, ids in sorted(missing.items()) for node_id in ids
    ])


def _validate_node(node: Node, spec: NodeSpec, workflow: Workflow, catalog: Catalog,
                   problems: ProblemCollector) -> Node:
    where = {"node_id": node.id, "class_type": node.class_type}
    inputs: dict[str, Any] = dict(node.inputs)
    for input_spec in spec.inputs:
        name = input_spec.name
        if name not in node.inputs:
            if input_spec.required:
                problems.add("required input is missing", "required_input_missing", input_name=name, **where)
            continue
        value = node.inputs[name]
        if isinstance(value, Link):
            _check_link(value, input_spec, workflow, catalog, problems, where)
        elif input_spec.type in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
            inputs[name] = _check_constant(value, input_spec, problems, where)
        else:
            problems.add(f"expects a link from a {input_spec.type} output, got the constant {_short(value)}",
                         "bad_linked_input", input_name=name, **where)
    return replace(node, inputs=inputs)


def _check_link(link: Link, input_spec: InputSpec, workflow: Workflow, catalog: Catalog,
                problems: ProblemCollector, where: dict) -> None:
    origin = workflow.nodes.get(link.node)
    if origin is None:
        return  # already reported while pruning
    origin_spec = catalog.get(origin.class_type)
    if not 0 <= link.output < len(origin_spec.outputs):
        problems.add(f"linked to output {link.output} of node {link.node} ({origin.class_type}), which has "
                     f"{len(origin_spec.outputs)} output(s)", "bad_linked_input", input_name=input_spec.name, **where)
        return
    received = origin_spec.outputs[link.output].type
    if not types_compatible(received, input_spec.type):
        problems.add(f"return type mismatch between linked nodes: node {link.node} ({origin.class_type}) output "
                     f"{link.output} is {received}, the input expects {input_spec.type}",
                     "return_type_mismatch", input_name=input_spec.name, **where)


def types_compatible(received: str, expected: str) -> bool:
    """ComfyUI's ``validate_node_input``: equal, ``*`` on either side, or comma-separated sets that meet.
    A primitive output may feed a COMBO input (primitive nodes do)."""
    if received == expected or "*" in (received, expected):
        return True
    if expected == "COMBO" and received in ("STRING", "COMBO"):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def _check_constant(value: Any, spec: InputSpec, problems: ProblemCollector, where: dict) -> Any:
    name = spec.name
    if spec.type == "COMBO":
        if spec.choices is not None and value not in spec.choices:
            shown = list(spec.choices) if len(spec.choices) <= 20 else f"(list of length {len(spec.choices)})"
            problems.add(f"value not in list: {_short(value)} not in {shown}", "value_not_in_list",
                         input_name=name, **where)
        _check_file_name(value, spec, problems, where)
        return value
    try:
        coerced = _coerce(value, spec.type)
    except (TypeError, ValueError, OverflowError):
        problems.add(f"failed to convert {_short(value)} to a {spec.type} value", "invalid_input_type",
                     input_name=name, **where)
        return value
    if spec.type in ("INT", "FLOAT"):
        _check_bounds(coerced, spec, problems, where)
    if spec.type == "STRING" and spec.folder:
        _check_file_name(coerced, spec, problems, where)
    return coerced


def _coerce(value: Any, kind: str) -> Any:
    if kind == "INT":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        if isinstance(value, str):
            return int(value.strip())
        return int(value)
    if kind == "FLOAT":
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            result = float(value)
        else:
            raise TypeError(type(value).__name__)
        if math.isnan(result):
            raise ValueError("NaN")
        return result
    if kind == "STRING":
        if isinstance(value, dict | list):
            raise TypeError(type(value).__name__)
        return str(value)
    if kind == "BOOLEAN":
        if isinstance(value, str):
            if value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError(value)
        return bool(value)
    return value


def _check_bounds(value: float, spec: InputSpec, problems: ProblemCollector, where: dict) -> None:
    low, high = spec.options.get("min"), spec.options.get("max")
    if low is not None and value < low:
        problems.add(f"value {value} smaller than min of {low}", "value_smaller_than_min",
                     input_name=spec.name, **where)
    if high is not None and value > high:
        problems.add(f"value {value} bigger than max of {high}", "value_bigger_than_max",
                     input_name=spec.name, **where)
    if isinstance(value, float) and math.isinf(value):
        problems.add("value is infinite", "invalid_input_type", input_name=spec.name, **where)


def _check_file_name(value: Any, spec: InputSpec, problems: ProblemCollector, where: dict) -> None:
    if not isinstance(value, str):
        return
    if spec.folder == "input":
        # URIs (file://, s3://) are checked against the input folder and store where those are known
        sentence = folder_name_problem(value)
        if sentence:
            problems.add(sentence, "bad_input_image", input_name=spec.name, **where)
        return
    reason = path_escape_reason(value)
    if reason:
        folder = f" folder '{spec.folder}'" if spec.folder else " folder"
        problems.add(f"file name {value!r} escapes its{folder}: {reason}", "path_escape",
                     input_name=spec.name, **where)


def path_escape_reason(name: str) -> str | None:
    """Why a file name from a workflow would leave its root folder, or None if it stays inside."""
    for suffix in _ANNOTATIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if "\x00" in name:
        return "it contains a NUL byte"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute paths are not allowed"
    if any(part == ".." for part in name.replace("\\", "/").split("/")):
        return "'..' is not allowed"
    return None


def _check_acyclic(nodes: dict[str, Node], where: str) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(start: str) -> list[str] | None:
        stack = [(start, iter(sorted_node_ids({link.node for link in nodes[start].links().values()})))]
        path = [start]
        state[start] = 1
        while stack:
            node_id, upstream = stack[-1]
            nxt = next(upstream, None)
            if nxt is None:
                state[node_id] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state and nxt in nodes:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted_node_ids({link.node for link in nodes[nxt].links().values()}))))
        return None

    for node_id in sorted_node_ids(nodes):
        if node_id not in state:
            cycle = visit(node_id)
            if cycle:
                first = nodes[cycle[0]]
                chain = " <- ".join(cycle)
                raise WorkflowError(Problem(f"dependency cycle: {chain}", "dependency_cycle", file=where,
                                            node_id=first.id, class_type=first.class_type))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
