"""UI ("workflow", schema 0.4) documents -> the canonical :class:`~airflow_comfy.workflow.graph.Workflow`.

Reproduces what ComfyUI's frontend does when it queues a workflow (``graphToPrompt``):

* ``widgets_values`` are positional over the node's widgets, which follow the catalog's input order; the
  frontend-only extras (``control_after_generate``, the combo filter, the upload button) take a slot each
  and are not sent;
* frontend-only nodes (Note, MarkdownNote, Reroute, PrimitiveNode) are never emitted: Reroutes are followed
  through their input, a PrimitiveNode's value becomes a constant of every input it feeds;
* muted nodes (mode 2) are not emitted and inputs linked to them are dropped; bypassed nodes (mode 4) are
  not emitted and their consumers are re-wired to one of the bypassed node's inputs;
* subgraph instances are flattened: inner nodes get ids ``"<instance>:<inner>"``.

The document is first read into small typed records (:class:`UIGraph`, :class:`UINode`, :class:`UILink`),
collecting a :class:`~airflow_comfy.workflow.errors.Problem` for every malformed part, so that the
conversion proper never trips over bad input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_comfy.workflow.catalog import WIDGET_TYPES, Catalog, InputSpec, NodeSpec
from airflow_comfy.workflow.errors import Problem, ProblemCollector, WorkflowError
from airflow_comfy.workflow.graph import Link, Node, UIGroup, Workflow, sorted_node_ids

FRONTEND_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
"""Node types that exist only in the editor and are never sent to the backend."""

MODE_MUTED = 2
MODE_BYPASSED = 4
SUBGRAPH_INPUT_ID = "-10"
SUBGRAPH_OUTPUT_ID = "-20"
TITLE_HEIGHT = 30.0
COLLAPSED_WIDTH = 80.0
MAX_SUBGRAPH_DEPTH = 32
"""How many subgraph instances may nest inside one another (the editor's own workflows use a few)."""


# --------------------------------------------------------------------------------------------------------
# Typed records of the UI document


@dataclass(frozen=True)
class UISlot:
    """An entry of a node's ``inputs`` / ``outputs`` (or of a subgraph definition's ``inputs`` / ``outputs``)."""

    name: str
    type: str
    link: int | str | None = None
    """For inputs: the id of the link feeding it."""
    widget: str | None = None
    """For inputs: the name of the widget this socket stands for (a widget converted to an input)."""
    link_ids: tuple = ()
    """For subgraph definition outputs: the ids of the links that reach them."""


@dataclass
class UINode:
    id: str
    type: str
    mode: int = 0
    title: str | None = None
    inputs: list[UISlot] = field(default_factory=list)
    outputs: list[UISlot] = field(default_factory=list)
    widgets_values: list | dict | None = None
    properties: dict = field(default_factory=dict)
    rect: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class UILink:
    id: int | str
    origin: str
    origin_slot: int
    target: str
    target_slot: int
    type: str


@dataclass
class UIGraph:
    """The top-level graph or one subgraph definition."""

    label: str
    """How messages name this graph: ``""`` for the top level, else ``subgraph '<name>'``."""
    nodes: dict[str, UINode]
    links: dict[int | str, UILink]
    id: str = ""
    inputs: list[UISlot] = field(default_factory=list)
    outputs: list[UISlot] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# Public API


def convert_ui(doc: dict, catalog: Catalog, *, name: str, source: str | None = None) -> Workflow:
    """Convert a UI-format document into the canonical graph, as the frontend's ``graphToPrompt`` would.

    Raises one :class:`WorkflowError` carrying every problem found (unknown node types, broken links, ...).
    """
    problems = ProblemCollector(source)
    try:
        workflow = _Converter(doc, catalog, problems).run(name, source)
    except WorkflowError as exc:
        raise exc.located(source) if source else exc from None
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, RecursionError) as exc:
        message = f"malformed UI workflow ({type(exc).__name__}: {exc})"
        raise WorkflowError(Problem(message, "malformed_workflow"), file=source) from exc
    return workflow


def widget_layout(spec: NodeSpec, count: int | None = None) -> list[str | None]:
    """The input name behind each ``widgets_values`` position of a node of class ``spec`` (``None`` for the
    frontend-only extras). ``count``, the length of the stored list, selects the legacy layout that still
    had slots for ``forceInput`` inputs when it matches that layout and not the current one."""
    layout = _layout(spec, with_forced=False)
    if count is not None and count != len(layout):
        legacy = _layout(spec, with_forced=True)
        if count == len(legacy):
            return legacy
    return layout


def widget_values(spec: NodeSpec, stored: list | dict | None) -> dict[str, Any]:
    """Input name -> value for every widget input of ``spec``, read from a node's ``widgets_values``;
    missing values take the frontend's defaults, extra trailing values are ignored."""
    widgets = spec.widget_inputs
    if isinstance(stored, Mapping):
        return {w.name: stored[w.name] if w.name in stored else w.frontend_default() for w in widgets}
    stored = stored if isinstance(stored, list) else []
    by_name: dict[str, Any] = {}
    for position, input_name in enumerate(widget_layout(spec, len(stored))):
        if input_name is not None and position < len(stored) and input_name not in by_name:
            by_name[input_name] = stored[position]
    return {w.name: by_name[w.name] if w.name in by_name else w.frontend_default() for w in widgets}


def count_ui_nodes(doc: Mapping[str, Any]) -> int:
    """How many nodes the document holds once every subgraph instance is expanded (the instances count too).
    Tolerates malformed parts: they are reported by :func:`convert_ui`."""
    definitions = _raw_definitions(doc)
    memo: dict[str, int] = {}

    def count(nodes: Any, stack: tuple[str, ...]) -> int:
        total = 0
        for raw in nodes if isinstance(nodes, list) else ():
            total += 1
            node_type = raw.get("type") if isinstance(raw, Mapping) else None
            if (isinstance(node_type, str) and node_type in definitions and node_type not in stack
                    and len(stack) < MAX_SUBGRAPH_DEPTH):
                if node_type not in memo:
                    memo[node_type] = count(definitions[node_type].get("nodes"), stack + (node_type,))
                total += memo[node_type]
        return total

    return count(doc.get("nodes"), ())


def is_types_compatible(a: Any, b: Any) -> bool:
    """The frontend's link-type check: equal, a wildcard (``*`` or empty), or comma-separated sets that meet."""
    a_text, b_text = str(a or "").strip().upper(), str(b or "").strip().upper()
    if a_text in ("", "*", "0") or b_text in ("", "*", "0"):
        return True
    return bool(set(a_text.split(",")) & set(b_text.split(",")))


# --------------------------------------------------------------------------------------------------------
# Widget layout helpers


def _layout(spec: NodeSpec, *, with_forced: bool) -> list[str | None]:
    layout: list[str | None] = []
    for inp in spec.inputs:
        if inp.is_widget:
            layout.append(inp.name)
            layout.extend(_extra_slots(inp))
        elif with_forced and _is_forced_widget(inp):
            layout.append(None)  # a legacy slot whose value the frontend drops
            layout.extend(_extra_slots(inp))
    if any(inp.has_upload_widget for inp in spec.inputs):
        layout.append(None)  # the upload button, after every other widget
    return layout


def _extra_slots(inp: InputSpec) -> list[None]:
    if inp.has_control_after_generate:
        return [None]
    if inp.has_control_filter:
        return [None, None]
    return []


def _is_forced_widget(inp: InputSpec) -> bool:
    return inp.type in WIDGET_TYPES and bool(inp.options.get("forceInput"))


# --------------------------------------------------------------------------------------------------------
# Reading the document into typed records


def _raw_definitions(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    definitions = doc.get("definitions")
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, Mapping) else None
    out: dict[str, Mapping[str, Any]] = {}
    for raw in subgraphs if isinstance(subgraphs, list) else ():
        if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
            out.setdefault(raw["id"], raw)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _node_id(value: Any) -> str | None:
    """Node ids are ints (legacy: strings); links name them the same way. Canonical form: a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value:
        return value
    return None


def _link_id(value: Any) -> int | str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value:
        number = _integer_text(value)
        return value if number is None else number
    return None


def _integer_text(value: str) -> int | None:
    """The integer a string like ``"12"`` or ``"-10"`` writes in ASCII digits; ``None`` for any other string
    (``"²"``, ``"--3"``, one of more digits than Python converts)."""
    digits = value[1:] if value.startswith("-") else value
    if not (digits.isascii() and digits.isdigit()):
        return None
    try:
        return int(value)
    except ValueError:  # over sys.get_int_max_str_digits()
        return None


def _slot_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a number a float holds: not inf or NaN, nor an integer of 400 digits."""
    if not _is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _numbers(value: Any, count: int) -> list[float] | None:
    """The first ``count`` items of a list as finite floats (``None`` if any is missing or not one)."""
    if not isinstance(value, list | tuple) or len(value) < count:
        return None
    numbers = [_finite(item) for item in value[:count]]
    return [n for n in numbers if n is not None] if None not in numbers else None


def _slot(item: Mapping[str, Any]) -> UISlot:
    widget = item.get("widget")
    widget_name = widget.get("name") if isinstance(widget, Mapping) else None
    name = item.get("name")
    link_ids = item.get("linkIds")
    return UISlot(
        name=str(name) if name is not None else str(widget_name or ""),
        type=str(item.get("type") or ""),
        link=_link_id(item.get("link")),
        widget=str(widget_name) if widget_name is not None else None,
        link_ids=tuple(_link_id(v) for v in link_ids) if isinstance(link_ids, list) else (),
    )


def _pair(value: Any) -> tuple[float, float] | None:
    """``[x, y]``, or the ``{"0": x, "1": y}`` that old LiteGraph saved for typed arrays."""
    if isinstance(value, Mapping):
        value = [value.get("0"), value.get("1")]
    numbers = _numbers(value, 2)
    return (numbers[0], numbers[1]) if numbers else None


def _ref(value: Any) -> str:
    """A link id, node id or slot from the document, for messages (a 5,000-digit id is cut short)."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text):,} characters)"


def _shown(value: Any, limit: int = 80) -> str:
    """A short ``repr`` for messages."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long for repr()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Reader:
    """Reads the raw JSON into :class:`UIGraph` records, adding a problem for each malformed part."""

    def __init__(self, problems: ProblemCollector):
        self.problems = problems

    def graph(self, raw: Mapping[str, Any], label: str) -> UIGraph:
        nodes = self._nodes(raw.get("nodes"), label)
        links = self._links(raw.get("links"), label)
        graph = UIGraph(label, nodes, links)
        if label:  # a subgraph definition
            graph.id = str(raw.get("id"))
            graph.inputs = self._slots(raw.get("inputs"), label, None, "inputs")
            graph.outputs = self._slots(raw.get("outputs"), label, None, "outputs")
        return graph

    def groups(self, raw: Any) -> list[UIGroup]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problems.add("'groups' must be a list", "invalid_group")
            return []
        groups = []
        for index, item in enumerate(raw):
            group = self._group(index, item)
            if group is not None:
                groups.append(group)
        return groups

    def _group(self, index: int, item: Any) -> UIGroup | None:
        if not isinstance(item, Mapping):
            self.problems.add(f"group #{index} is not an object", "invalid_group")
            return None
        title = item.get("title") if isinstance(item.get("title"), str) else "Group"
        raw = item.get("bounding")
        bounding = _numbers(raw, 4)
        if bounding is None or len(raw) != 4:
            self.problems.add(f"group #{index} ('{title}'): 'bounding' must be four finite numbers "
                              f"[x, y, width, height], not {_shown(raw)}", "invalid_group")
            return None
        x, y, width, height = bounding
        return UIGroup(index, title, (x, y, width, height))

    # nodes ------------------------------------------------------------------------------------------------

    def _nodes(self, raw: Any, label: str) -> dict[str, UINode]:
        if not isinstance(raw, list):
            self.problems.add(f"{self._in(label)}'nodes' must be a list", "invalid_workflow")
            return {}
        nodes: dict[str, UINode] = {}
        for position, item in enumerate(raw):
            node = self._node(item, position, label)
            if node is None:
                continue
            if node.id in nodes:
                self.problems.add(f"{self._in(label)}two nodes have id {node.id}", "duplicate_node_id",
                                  node_id=node.id, class_type=node.type)
                continue
            nodes[node.id] = node
        return nodes

    def _node(self, raw: Any, position: int, label: str) -> UINode | None:
        if not isinstance(raw, Mapping):
            self.problems.add(f"{self._in(label)}nodes[{position}] is not an object", "invalid_node")
            return None
        node_id = _node_id(raw.get("id"))
        node_type = raw.get("type")
        if node_id is None or not isinstance(node_type, str) or not node_type:
            self.problems.add(f"{self._in(label)}nodes[{position}] needs an 'id' and a 'type'", "invalid_node",
                              node_id=node_id, class_type=node_type if isinstance(node_type, str) else None)
            return None
        where = {"node_id": node_id, "class_type": node_type}
        mode = raw.get("mode", 0)
        if mode is None:
            mode = 0
        if not isinstance(mode, int) or isinstance(mode, bool):
            self.problems.add(f"{self._in(label)}'mode' must be an integer, not {mode!r}", "invalid_node", **where)
            mode = 0
        widgets_values = raw.get("widgets_values")
        if widgets_values is not None and not isinstance(widgets_values, list | dict):
            self.problems.add(f"{self._in(label)}'widgets_values' must be a list or an object",
                              "invalid_widgets_values", **where)
            widgets_values = None
        title = raw.get("title")
        properties = raw.get("properties")
        return UINode(
            id=node_id,
            type=node_type,
            mode=mode,
            title=title if isinstance(title, str) else None,
            inputs=self._slots(raw.get("inputs"), label, node_id, "inputs", node_type),
            outputs=self._slots(raw.get("outputs"), label, node_id, "outputs", node_type),
            widgets_values=widgets_values,
            properties=dict(properties) if isinstance(properties, Mapping) else {},
            rect=self._rect(raw, label, where),
        )

    def _slots(self, raw: Any, label: str, node_id: str | None, key: str,
               node_type: str | None = None) -> list[UISlot]:
        if raw is None:
            return []
        where = {"node_id": node_id, "class_type": node_type}
        if not isinstance(raw, list):
            self.problems.add(f"{self._in(label)}'{key}' must be a list", "invalid_node", **where)
            return []
        slots = []
        for index, item in enumerate(raw):
            if not isinstance(item, Mapping):
                self.problems.add(f"{self._in(label)}{key}[{index}] is not an object", "invalid_node", **where)
                slots.append(UISlot("", ""))
                continue
            slot = _slot(item)
            if node_id is not None and item.get("link") is not None and slot.link is None:
                self.problems.add(f"{self._in(label)}{key}[{index}]: 'link' must be a link id (a whole number), "
                                  f"not {_shown(item.get('link'))}", "invalid_link", input_name=slot.name or None,
                                  **where)
            slots.append(slot)
        return slots

    def _rect(self, raw: Mapping[str, Any], label: str,
              where: dict[str, str]) -> tuple[float, float, float, float] | None:
        if raw.get("pos") is None:
            return None
        pos = _pair(raw.get("pos"))
        size = _pair(raw.get("size")) if raw.get("size") is not None else (0.0, 0.0)
        if pos is None or size is None:
            bad, form = ("pos", "[x, y]") if pos is None else ("size", "[width, height]")
            self.problems.add(f"{self._in(label)}'{bad}' must be two finite numbers {form}, not "
                              f"{_shown(raw.get(bad))}", "invalid_position", **where)
            return None
        flags = raw.get("flags")
        if isinstance(flags, Mapping) and flags.get("collapsed"):
            return (pos[0], pos[1] - TITLE_HEIGHT, COLLAPSED_WIDTH, TITLE_HEIGHT)
        return (pos[0], pos[1] - TITLE_HEIGHT, size[0], size[1] + TITLE_HEIGHT)

    # links ------------------------------------------------------------------------------------------------

    def _links(self, raw: Any, label: str) -> dict[int | str, UILink]:
        if raw is None:
            return {}
        if not isinstance(raw, list):
            self.problems.add(f"{self._in(label)}'links' must be a list", "invalid_link")
            return {}
        links: dict[int | str, UILink] = {}
        for position, item in enumerate(raw):
            link = self._link(item)
            if link is None:
                self.problems.add(f"{self._in(label)}links[{position}] is not a valid link "
                                  f"([id, origin, origin_slot, target, target_slot, type]): {item!r:.120}",
                                  "invalid_link")
                continue
            links.setdefault(link.id, link)
        return links

    @staticmethod
    def _link(raw: Any) -> UILink | None:
        if isinstance(raw, list) and len(raw) >= 5:
            fields = raw[:6] if len(raw) >= 6 else [*raw, ""]
        elif isinstance(raw, Mapping):
            fields = [raw.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        else:
            return None
        link_id, origin, origin_slot = _link_id(fields[0]), _node_id(fields[1]), _slot_index(fields[2])
        target, target_slot = _node_id(fields[3]), _slot_index(fields[4])
        if link_id is None or origin is None or target is None or origin_slot is None or target_slot is None:
            return None
        return UILink(link_id, origin, origin_slot, target, target_slot, str(fields[5] or ""))

    @staticmethod
    def _in(label: str) -> str:
        return f"in {label}: " if label else ""


# --------------------------------------------------------------------------------------------------------
# Conversion


@dataclass(frozen=True)
class _Const:
    """An input resolved to a constant (a PrimitiveNode's value or a subgraph's promoted widget)."""

    value: Any


class _Unresolved:
    """Nothing feeds the input: it keeps its widget value if it has one, else it is absent."""


class _Dropped:
    """The input is fed by a node that is not emitted (muted): the input is removed, widget value too."""


UNRESOLVED = _Unresolved()
DROPPED = _Dropped()
_Resolution = Link | _Const | _Unresolved | _Dropped


@dataclass(frozen=True)
class _Hop:
    """The next link to follow while resolving an input: in ``scope``, wanted as ``want_type``."""

    scope: _Scope
    link_id: int | str
    want_type: str


@dataclass
class _Scope:
    """One graph being flattened: the top level, or a subgraph definition under one instance path."""

    graph: UIGraph
    path: tuple[str, ...] = ()
    parent: _Scope | None = None
    instance: UINode | None = None
    rect: tuple[float, float, float, float] | None = None
    promoted: dict[str, Any] = field(default_factory=dict)
    """Definition input name -> the instance's promoted widget value."""
    overrides: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(inner node id, widget name) -> value, from the instance's ``proxyWidgets``."""

    def execution_id(self, node_id: str) -> str:
        return ":".join((*self.path, node_id))


@dataclass
class _Consumer:
    """The emitted node input whose link is being resolved (for messages)."""

    node_id: str
    class_type: str
    input_name: str


class _Converter:
    def __init__(self, doc: Mapping[str, Any], catalog: Catalog, problems: ProblemCollector):
        self.doc = doc
        self.catalog = catalog
        self.problems = problems
        self.reader = _Reader(problems)
        self.definitions: dict[str, UIGraph] = {}
        self.scopes: dict[tuple[str, ...], _Scope] = {}
        self.nodes: dict[str, Node] = {}
        self.unknown: list[Problem] = []

    def run(self, name: str, source: str | None) -> Workflow:
        if not isinstance(self.doc, Mapping):
            raise WorkflowError(Problem("a UI workflow must be a JSON object", "invalid_workflow"))
        self.definitions = self._read_definitions()
        top = _Scope(self.reader.graph(self.doc, ""))
        self.scopes[()] = top
        groups = self.reader.groups(self.doc.get("groups"))
        self._emit_scope(top)
        self._drop_links_to_missing_nodes()
        problems = [*self.unknown, *self.problems.problems]  # unknown node types first
        if problems:
            raise WorkflowError(problems, file=self.problems.file)
        ordered = {node_id: self.nodes[node_id] for node_id in sorted_node_ids(self.nodes)}
        return Workflow(name=name, nodes=ordered, source=source, format="ui", groups=groups,
                        ui_workflow=self.doc)

    def _read_definitions(self) -> dict[str, UIGraph]:
        definitions = self.doc.get("definitions")
        if definitions is None:
            return {}
        if not isinstance(definitions, Mapping):
            self.problems.add("'definitions' must be an object", "invalid_subgraph")
            return {}
        subgraphs = definitions.get("subgraphs")
        if subgraphs is None:
            subgraphs = []
        if not isinstance(subgraphs, list):
            self.problems.add("'definitions.subgraphs' must be a list", "invalid_subgraph")
            return {}
        out: dict[str, UIGraph] = {}
        for index, raw in enumerate(subgraphs):
            if not isinstance(raw, Mapping) or not isinstance(raw.get("id"), str):
                self.problems.add(f"definitions.subgraphs[{index}] needs an 'id'", "invalid_subgraph")
                continue
            label = f"subgraph '{raw.get('name') or raw['id']}'"
            out.setdefault(raw["id"], self.reader.graph(raw, label))
        return out

    # walking the graphs ---------------------------------------------------------------------------------

    def _emit_scope(self, scope: _Scope) -> None:
        for node in scope.graph.nodes.values():
            if node.mode in (MODE_MUTED, MODE_BYPASSED) or node.type in FRONTEND_ONLY_TYPES:
                continue
            if node.type in self.definitions:
                self._emit_instance(scope, node)
                continue
            spec = self.catalog.get(node.type)
            if spec is None:
                self._unknown(scope, node)
                continue
            try:
                self._emit_node(scope, node, spec)
            except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
                self.problems.add(f"cannot convert this node ({type(exc).__name__}: {exc})", "malformed_node",
                                  node_id=scope.execution_id(node.id), class_type=node.type)

    def _emit_instance(self, scope: _Scope, node: UINode) -> None:
        if _is_inside(scope, node.type):
            self.problems.add("a subgraph contains an instance of itself", "subgraph_cycle",
                              node_id=scope.execution_id(node.id), class_type=node.type)
            return
        if len(scope.path) >= MAX_SUBGRAPH_DEPTH:
            self.problems.add(f"subgraph instances are nested more than {MAX_SUBGRAPH_DEPTH} deep",
                              "subgraph_too_deep", node_id=scope.execution_id(node.id), class_type=node.type)
            return
        self._emit_scope(self._child_scope(scope, node))

    def _unknown(self, scope: _Scope, node: UINode) -> None:
        sources = ", ".join(self.catalog.sources) or "empty catalog"
        self.unknown.append(Problem(
            f"unknown node type '{node.type}': it is not in the node catalog ({sources}); if it comes from a "
            "custom node pack, pass that ComfyUI server's /object_info JSON with --object-info",
            "unknown_node_type", node_id=scope.execution_id(node.id), class_type=node.type,
        ))

    def _child_scope(self, scope: _Scope, instance: UINode) -> _Scope:
        path = (*scope.path, instance.id)
        if path not in self.scopes:
            definition = self.definitions[instance.type]
            child = _Scope(definition, path, scope, instance, scope.rect if scope.path else instance.rect)
            child.promoted, child.overrides = _promoted_values(instance, definition)
            self.scopes[path] = child
        return self.scopes[path]

    # one node -----------------------------------------------------------------------------------------------

    def _emit_node(self, scope: _Scope, node: UINode, spec: NodeSpec) -> None:
        node_id = scope.execution_id(node.id)
        inputs = widget_values(spec, node.widgets_values)
        for (inner_id, widget_name), value in scope.overrides.items():
            if inner_id == node.id and widget_name in inputs:
                inputs[widget_name] = value
        for slot in node.inputs:
            if slot.link is None:
                continue
            consumer = _Consumer(node_id, node.type, slot.name)
            self._apply(inputs, slot.name, self._resolve(scope, slot.link, slot.type, consumer))
        self.nodes[node_id] = Node(
            id=node_id,
            class_type=node.type,
            inputs=inputs,
            title=node.title if node.title is not None else (spec.display_name or node.type),
            rect=scope.rect if scope.path else node.rect,
        )

    @staticmethod
    def _apply(inputs: dict[str, Any], name: str, resolved: _Resolution) -> None:
        if isinstance(resolved, Link):
            inputs[name] = resolved
        elif isinstance(resolved, _Const):
            inputs[name] = resolved.value
        elif isinstance(resolved, _Dropped):
            inputs.pop(name, None)

    def _drop_links_to_missing_nodes(self) -> None:
        """As the frontend does last: an input linked to a node that was not emitted is removed."""
        for node in self.nodes.values():
            for name, link in list(node.links().items()):
                if link.node not in self.nodes:
                    del node.inputs[name]

    # link resolution ------------------------------------------------------------------------------------

    def _resolve(self, scope: _Scope, link_id: int | str, want_type: str, consumer: _Consumer) -> _Resolution:
        """Follow a link back to the node output (or constant) that really feeds the consumer: through
        Reroutes, bypassed nodes and subgraph boundaries, in either direction."""
        seen: set[tuple[tuple[str, ...], int | str]] = set()
        while True:
            if (scope.path, link_id) in seen:
                self._problem(consumer, "its link goes round in a circle (Reroutes, bypassed nodes or "
                                        "subgraph boundaries)", "link_cycle")
                return UNRESOLVED
            seen.add((scope.path, link_id))
            link = scope.graph.links.get(link_id)
            if link is None:
                self._problem(consumer, f"{self._in(scope)}link {_ref(link_id)} is not in the links list",
                              "missing_link")
                return UNRESOLVED
            step = self._step(scope, link, want_type, consumer)
            if not isinstance(step, _Hop):
                return step
            scope, link_id, want_type = step.scope, step.link_id, step.want_type

    def _step(self, scope: _Scope, link: UILink, want_type: str,
              consumer: _Consumer) -> _Resolution | _Hop:
        """One hop: either the final resolution or the next (scope, link id, wanted type) to follow."""
        if link.origin == SUBGRAPH_INPUT_ID and scope.instance is not None:
            return self._through_subgraph_input(scope, link, consumer)
        origin = scope.graph.nodes.get(link.origin)
        if origin is None:
            self._problem(consumer, f"{self._in(scope)}link {_ref(link.id)} comes from node "
                                    f"{_ref(link.origin)}, which does not exist", "link_to_missing_node")
            return UNRESOLVED
        if origin.type == "PrimitiveNode":
            return _primitive_value(origin)
        if origin.mode == MODE_BYPASSED:
            return self._through_bypass(scope, origin, link.origin_slot, want_type)
        if origin.type in self.definitions:
            return self._into_subgraph_output(scope, origin, link, consumer, want_type)
        if origin.type == "Reroute":
            return self._through_reroute(scope, origin, link.origin_slot, want_type)
        if origin.type in FRONTEND_ONLY_TYPES:
            return UNRESOLVED
        if origin.mode == MODE_MUTED:
            return DROPPED
        return self._output_link(scope, origin, link, consumer)

    def _output_link(self, scope: _Scope, origin: UINode, link: UILink, consumer: _Consumer) -> _Resolution:
        spec = self.catalog.get(origin.type)
        if spec is not None and not 0 <= link.origin_slot < len(spec.outputs):
            origin_id = scope.execution_id(origin.id)
            self._problem(consumer, f"{self._in(scope)}link {_ref(link.id)} uses output slot "
                                    f"{_ref(link.origin_slot)} of node {origin_id} ({origin.type}), which "
                                    f"has {len(spec.outputs)} output(s)", "invalid_link_slot")
            return UNRESOLVED
        return Link(scope.execution_id(origin.id), link.origin_slot)

    @staticmethod
    def _through_reroute(scope: _Scope, node: UINode, slot: int,
                         want_type: str) -> _Resolution | _Hop:
        feed = node.inputs[slot] if 0 <= slot < len(node.inputs) else None
        if feed is None or feed.link is None:
            return UNRESOLVED
        return _Hop(scope, feed.link, want_type)

    @staticmethod
    def _through_bypass(scope: _Scope, node: UINode, slot: int,
                        want_type: str) -> _Resolution | _Hop:
        index = _bypass_input_index(node, slot, want_type)
        if index is None or node.inputs[index].link is None:
            return UNRESOLVED
        feed = node.inputs[index]
        return _Hop(scope, feed.link, feed.type)

    def _into_subgraph_output(self, scope: _Scope, instance: UINode, link: UILink, consumer: _Consumer,
                              want_type: str) -> _Resolution | _Hop:
        if instance.mode == MODE_MUTED:
            return DROPPED
        if _is_inside(scope, instance.type):
            return UNRESOLVED  # a subgraph containing itself: reported once by _emit_instance
        definition = self.definitions[instance.type]
        if not 0 <= link.origin_slot < len(definition.outputs):
            instance_id = scope.execution_id(instance.id)
            outputs = len(definition.outputs)
            self._problem(consumer, f"{self._in(scope)}link {_ref(link.id)} uses output slot "
                                    f"{_ref(link.origin_slot)} of subgraph node {instance_id}, whose "
                                    f"definition has {outputs} output(s)", "invalid_link_slot")
            return UNRESOLVED
        inner_link = _link_into_output(definition, link.origin_slot)
        if inner_link is None:
            return UNRESOLVED
        return _Hop(self._child_scope(scope, instance), inner_link, want_type)

    def _through_subgraph_input(self, scope: _Scope, link: UILink,
                                consumer: _Consumer) -> _Resolution | _Hop:
        definition, instance = scope.graph, scope.instance
        assert instance is not None and scope.parent is not None
        if not 0 <= link.origin_slot < len(definition.inputs):
            self._problem(consumer, f"{self._in(scope)}link {_ref(link.id)} uses input slot "
                                    f"{_ref(link.origin_slot)} of the subgraph, which has "
                                    f"{len(definition.inputs)} input(s)", "invalid_link_slot")
            return UNRESOLVED
        name = definition.inputs[link.origin_slot].name
        outer = _instance_input(instance, name, link.origin_slot, definition)
        if outer is not None and outer.link is not None:
            return _Hop(scope.parent, outer.link, outer.type)
        if name in scope.promoted:
            return _Const(scope.promoted[name])
        return UNRESOLVED

    # messages ---------------------------------------------------------------------------------------------

    def _problem(self, consumer: _Consumer, message: str, kind: str) -> None:
        self.problems.add(message, kind, node_id=consumer.node_id, class_type=consumer.class_type,
                          input_name=consumer.input_name)

    @staticmethod
    def _in(scope: _Scope) -> str:
        return f"in {scope.graph.label}: " if scope.graph.label else ""


# --------------------------------------------------------------------------------------------------------
# Resolution helpers


def _is_inside(scope: _Scope | None, definition_id: str) -> bool:
    """Whether ``scope`` is (within) an instance of the subgraph definition ``definition_id``."""
    while scope is not None and scope.instance is not None:
        if scope.instance.type == definition_id:
            return True
        scope = scope.parent
    return False


def _primitive_value(node: UINode) -> _Resolution:
    values = node.widgets_values
    if isinstance(values, list) and values:
        return _Const(values[0])
    if isinstance(values, Mapping) and values:
        return _Const(next(iter(values.values())))
    return UNRESOLVED


def _bypass_input_index(node: UINode, slot: int, want_type: str) -> int | None:
    """Which input a bypassed node passes to the consumer of its output ``slot``: the input at the same
    index if its type fits, else the first input of exactly the wanted type, else the first that fits."""
    inputs = node.inputs
    if not inputs:
        return None
    output_type = node.outputs[slot].type if 0 <= slot < len(node.outputs) else want_type
    if str(want_type or "").strip() in ("", "*"):
        return slot if slot < len(inputs) else 0

    def fits(candidate: UISlot) -> bool:
        return is_types_compatible(candidate.type, output_type) and is_types_compatible(candidate.type, want_type)

    if slot < len(inputs) and fits(inputs[slot]):
        return slot
    for index, candidate in enumerate(inputs):
        if candidate.type == want_type:
            return index
    for index, candidate in enumerate(inputs):
        if fits(candidate):
            return index
    return None


def _link_into_output(definition: UIGraph, slot: int) -> int | str | None:
    """The id of the link inside ``definition`` that reaches its output ``slot``."""
    for link_id in definition.outputs[slot].link_ids:
        if link_id in definition.links:
            return link_id
    for link in definition.links.values():
        if link.target == SUBGRAPH_OUTPUT_ID and link.target_slot == slot:
            return link.id
    return None


def _instance_input(instance: UINode, name: str, slot: int, definition: UIGraph) -> UISlot | None:
    """The instance's input socket for definition input ``name`` (matched by name: instances saved by older
    frontends do not list the unlinked widget inputs, so positions can differ)."""
    for candidate in instance.inputs:
        if candidate.name == name or candidate.widget == name:
            return candidate
    names = {inp.name for inp in definition.inputs}
    if slot < len(instance.inputs) and instance.inputs[slot].name not in names:
        return instance.inputs[slot]
    return None


def _promoted_values(instance: UINode,
                     definition: UIGraph) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
    """The instance's promoted widget values: by definition input name, and by (inner node, widget)."""
    values = instance.widgets_values
    if isinstance(values, Mapping):
        return dict(values), {}
    if not isinstance(values, list) or not values:
        return {}, {}
    proxies = _proxy_widgets(instance)
    if proxies and len(proxies) == len(values):
        promoted: dict[str, Any] = {}
        overrides: dict[tuple[str, str], Any] = {}
        for (inner_id, widget_name), value in zip(proxies, values, strict=False):
            if inner_id == "-1":
                promoted[widget_name] = value
            else:
                overrides[(inner_id, widget_name)] = value
        return promoted, overrides
    widget_inputs = [inp.name for inp in definition.inputs if inp.type.upper() in WIDGET_TYPES]
    return dict(zip(widget_inputs, values, strict=False)), {}


def _proxy_widgets(instance: UINode) -> list[tuple[str, str]]:
    raw = instance.properties.get("proxyWidgets")
    out: list[tuple[str, str]] = []
    for entry in raw if isinstance(raw, list) else ():
        if isinstance(entry, list | tuple) and len(entry) == 2 and _node_id(entry[0]) and isinstance(entry[1], str):
            out.append((str(_node_id(entry[0])), entry[1]))
    return out

