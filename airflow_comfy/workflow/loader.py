"""Read a workflow file (ComfyUI UI or API format) into the canonical :class:`Workflow`, defensively.

Checks, in order: the file's size (before reading it), UTF-8, JSON syntax (integers Python can read
included), how deeply the JSON nests, the top-level type, the format, the node count (subgraph inner nodes
included), then converts. Every :class:`WorkflowError` raised here names the file.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from airflow_comfy.workflow.api_format import convert_api, is_api_prompt, is_post_body, unwrap_prompt
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.errors import Problem, WorkflowError
from airflow_comfy.workflow.graph import Workflow
from airflow_comfy.workflow.ui_format import convert_ui, count_ui_nodes

DEFAULT_MAX_BYTES = 5_000_000
DEFAULT_MAX_NODES = 2_000
MAX_DEPTH = 100
"""How deeply a workflow's JSON may nest (a ComfyUI document needs about ten levels). Deeper values would
make later passes (copying, encoding the group specs) overflow Python's recursion limit."""


def load_workflow(path: str | Path, catalog: Catalog, *, max_bytes: int = DEFAULT_MAX_BYTES,
                  max_nodes: int = DEFAULT_MAX_NODES) -> Workflow:
    """Load ``path`` (UI or API format). The workflow's name is the file's stem."""
    path = Path(path)
    source = str(path)
    data = read_workflow_file(path, max_bytes)
    return parse_workflow_text(data, catalog, name=path.stem, source=source, max_nodes=max_nodes)


def parse_workflow_text(text: str | bytes, catalog: Catalog, *, name: str, source: str | None = None,
                        max_nodes: int = DEFAULT_MAX_NODES) -> Workflow:
    """Parse a workflow document held in memory (``source`` names it in messages)."""
    try:
        doc = _parse_json(_decode(text))
        _check_depth(doc)
        if not isinstance(doc, dict):
            raise WorkflowError(Problem(
                f"the top level is a JSON {_json_type(doc)}; a ComfyUI workflow is a JSON object "
                "(UI format with a 'nodes' list, or API format: node id -> {class_type, inputs})",
                "not_a_workflow"))
        kind = workflow_format(doc)
        _check_node_count(doc, kind, max_nodes)
        if kind == "ui":
            return convert_ui(doc, catalog, name=name, source=source)
        return convert_api(doc, name=name, source=source)
    except WorkflowError as exc:
        raise exc.located(source) if source else exc from None


def workflow_format(doc: Any) -> Literal["ui", "api"]:
    """``"ui"`` for an editor document (it has a ``nodes`` list), ``"api"`` for a prompt (an object of nodes
    with ``class_type``, or a POST /prompt body); anything else is refused."""
    if isinstance(doc, Mapping) and isinstance(doc.get("nodes"), list):
        return "ui"
    if is_api_prompt(doc) or (is_post_body(doc) and is_api_prompt(doc["prompt"])):
        return "api"
    raise WorkflowError(Problem(
        "neither ComfyUI UI nor API format: expected a 'nodes' list (UI format, as the editor saves) or an "
        "object of node id -> {class_type, inputs} (API format)", "unknown_format"))


def read_workflow_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES, *, limit_setting: str | None = None) -> bytes:
    """The file's bytes, refusing it from its size alone when it is over ``max_bytes`` (``limit_setting``: the
    setting that sets the limit, named in the error); a file that cannot be read is a :class:`WorkflowError`
    naming it."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_large(source, size, max_bytes, limit_setting)
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise WorkflowError(Problem(f"cannot read the workflow file: {exc.strerror or exc}", "unreadable_file",
                                    file=source)) from None
    if len(data) > max_bytes:  # it grew after the size check
        raise _too_large(source, len(data), max_bytes, limit_setting)
    return data


def _too_large(source: str, size: int, max_bytes: int, limit_setting: str | None) -> WorkflowError:
    limit = f"the limit is {max_bytes:,} bytes" + (f", {limit_setting}" if limit_setting else "")
    return WorkflowError(Problem(f"the file is too large ({size:,} bytes; {limit})", "too_large", file=source))


def _decode(text: str | bytes) -> str:
    if isinstance(text, str):
        return text.removeprefix("\ufeff")
    try:
        return text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise WorkflowError(Problem(
            f"the file is not UTF-8 text (invalid byte 0x{text[exc.start]:02x} at offset {exc.start})",
            "invalid_encoding")) from None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(Problem(
            f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", "invalid_json")) from None
    except RecursionError:
        raise WorkflowError(Problem("not valid JSON: nested too deeply", "invalid_json")) from None
    except ValueError:  # Python refuses to read an integer of more digits than sys.get_int_max_str_digits()
        raise WorkflowError(Problem(_long_number_message(text), "invalid_json")) from None


_STRING_OR_NUMBER = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?([0-9]+)([.eE][-+.eE0-9]*)?')


def _long_number_message(text: str) -> str:
    """Where the integer too long for Python is: the first integer, outside strings, over the limit."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()  # Python >= 3.10.7
    for match in _STRING_OR_NUMBER.finditer(text):
        digits, fraction = match.group(1, 2)
        if digits and not fraction and len(digits) > limit:
            line = text.count("\n", 0, match.start()) + 1
            column = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
            return (f"not valid JSON: the number at line {line}, column {column} has {len(digits):,} digits; "
                    f"the most a workflow may use is {limit:,}")
    return f"not valid JSON: a number has more than {limit:,} digits" if limit else "not valid JSON"


def _check_depth(doc: Any) -> None:
    if _depth_over(doc, MAX_DEPTH):
        raise WorkflowError(Problem(f"the JSON is nested more than {MAX_DEPTH} levels deep, at "
                                    f"{_deep_path(doc, MAX_DEPTH)}", "too_deep"))


def _depth_over(doc: Any, limit: int) -> bool:
    """Whether some value lies more than ``limit`` containers deep (walked without recursion)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((item, depth + 1) for item in items if isinstance(item, dict | list))
    return False


def _deep_path(doc: Any, limit: int, shown: int = 8) -> str:
    """Where the nesting goes too deep, as ``nodes[4].widgets_values[0][0]...`` (its first ``shown`` steps)."""
    path: list[str] = []
    value = doc
    while len(path) < shown:
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        deeper = [(key, item) for key, item in items if _depth_over(item, limit - len(path) - 1)]
        if not deeper:
            break
        key, value = deeper[0]
        path.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(path).lstrip(".") + ("..." if len(path) == shown else "")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "list (array)"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


def _check_node_count(doc: Mapping[str, Any], kind: str, max_nodes: int) -> None:
    if kind == "ui":
        try:
            count = count_ui_nodes(doc)
        except RecursionError:
            raise WorkflowError(Problem("subgraphs are nested too deeply", "too_many_nodes")) from None
        what = "nodes (subgraph inner nodes included)"
    else:
        prompt, _ = unwrap_prompt(doc)
        count = len(prompt) if isinstance(prompt, Mapping) else 0
        what = "nodes"
    if count > max_nodes:
        raise WorkflowError(Problem(f"the workflow has {count:,} {what}; the limit is {max_nodes:,}",
                                    "too_many_nodes"))
