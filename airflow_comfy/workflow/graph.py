"""The canonical workflow graph: ComfyUI's API ("prompt") form plus what the UI knew about layout.

Every loader (API format, UI format) produces a :class:`Workflow`; validation, slicing and the DAG factory
only ever see this shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Link(NamedTuple):
    """An input fed by output ``output`` of node ``node`` (API form: ``["node", output]``)."""

    node: str
    output: int

    def to_api(self) -> list:
        return [self.node, self.output]


def is_api_link(value: Any) -> bool:
    """ComfyUI's rule: a 2-element list whose first item is a string and second a number is a link."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
        and not isinstance(value[1], bool)
    )


@dataclass
class Node:
    id: str
    class_type: str
    inputs: dict[str, Any] = field(default_factory=dict)
    """Input name -> constant value or :class:`Link`."""
    title: str | None = None
    rect: tuple[float, float, float, float] | None = None
    """The node's bounding rectangle ``(x, y, w, h)`` in top-level UI coordinates (title bar included), when
    the workflow came from the UI format; used for group membership by the frontend's centre rule."""

    def links(self) -> dict[str, Link]:
        return {name: value for name, value in self.inputs.items() if isinstance(value, Link)}

    def constants(self) -> dict[str, Any]:
        return {name: value for name, value in self.inputs.items() if not isinstance(value, Link)}

    def to_api(self) -> dict:
        inputs = {}
        for name, value in self.inputs.items():
            if isinstance(value, Link):
                inputs[name] = value.to_api()
            elif isinstance(value, list):
                inputs[name] = {"__value__": value}
            else:
                inputs[name] = value
        out: dict[str, Any] = {"inputs": inputs, "class_type": self.class_type}
        if self.title is not None:
            out["_meta"] = {"title": self.title}
        return out


@dataclass(frozen=True)
class UIGroup:
    """A group box of the UI format; membership is geometric (see ``slicing``)."""

    index: int
    title: str
    bounding: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        return self.bounding[2] * self.bounding[3]

    def contains_point(self, x: float, y: float) -> bool:
        gx, gy, gw, gh = self.bounding
        return gx <= x < gx + gw and gy <= y < gy + gh


@dataclass
class Workflow:
    name: str
    """A name for people and for ids: the file's stem."""
    nodes: dict[str, Node]
    source: str | None = None
    """Where it came from (a path), for error messages."""
    format: str = "api"
    """``api`` or ``ui``: the format of the file it was loaded from."""
    groups: list[UIGroup] = field(default_factory=list)
    ui_workflow: dict | None = None
    """The UI-format document, kept to embed in PNG metadata as ComfyUI does."""

    def to_api(self) -> dict[str, dict]:
        """The API-format prompt, ordered by node id as ComfyUI's frontend sends it."""
        return {node_id: self.nodes[node_id].to_api() for node_id in sorted_node_ids(self.nodes)}

    def consumers(self) -> dict[str, list[tuple[str, str, Link]]]:
        """node id -> [(consumer id, input name, link)] for every link out of that node."""
        out: dict[str, list[tuple[str, str, Link]]] = {node_id: [] for node_id in self.nodes}
        for node_id in sorted_node_ids(self.nodes):
            for name, link in self.nodes[node_id].links().items():
                out.setdefault(link.node, []).append((node_id, name, link))
        return out


def node_id_key(node_id: str) -> tuple:
    """Sort ids the way people read them: ``2`` before ``10``, ``5:3`` after ``5``. Any string is an id (the
    API format allows it): ``"²"`` or a 5,000-digit number sort too."""
    return tuple(_id_part_key(part) for part in node_id.split(":"))


def _id_part_key(part: str) -> tuple[int, int, str, str]:
    """Numbers (ASCII digits) first, in numeric order, compared as text: ``int()`` refuses ``"²"`` although
    ``"²".isdigit()``, and numbers of more than 4,300 digits."""
    if part.isascii() and part.isdigit():
        digits = part.lstrip("0")
        return (0, len(digits), digits, part)
    return (1, 0, part, part)


def sorted_node_ids(ids) -> list[str]:
    return sorted(ids, key=node_id_key)
