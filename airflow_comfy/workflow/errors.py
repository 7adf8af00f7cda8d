"""Errors that name what a person needs to fix: the file, the node id, its class type and the input."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow.

    ``kind`` is a short machine-readable tag (``required_input_missing``, ``value_not_in_list``, ...);
    where ComfyUI has a name for the same failure (the error types of its ``execution.py`` ``validate_prompt``
    and ``validate_inputs``) we use it.
    """

    message: str
    kind: str = "invalid_workflow"
    file: str | None = None
    node_id: str | None = None
    class_type: str | None = None
    input_name: str | None = None

    def located(self, file: str | None) -> Problem:
        """The same problem, attributed to ``file`` unless it already names one."""
        return self if self.file or not file else replace(self, file=file)

    def where(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.node_id is not None:
            node = f"node {_clip(self.node_id)}"
            if self.class_type:
                node += f" ({_clip(self.class_type)})"
            parts.append(node)
        elif self.class_type:
            parts.append(_clip(self.class_type))
        if self.input_name:
            parts.append(f"input '{_clip(self.input_name)}'")
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


def _clip(text: str, limit: int = 120) -> str:
    """An id or name from a hostile file, cut short for a one-paragraph message."""
    return text if len(text) <= limit else f"{text[:limit - 20]}...({len(text):,} characters)"


_NODE_TYPE_KINDS = {
    "unknown_node_type": "unknown node types (not in the node catalog: add the ComfyUI /object_info that "
                         "defines them with --object-info or [comfy] object_info_files)",
    "unsupported_node_type": "node types airflow-comfy's runner cannot execute",
}


class WorkflowError(ValueError):
    """A workflow cannot be loaded, validated or sliced. Carries every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem] | Problem | str, *, file: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = [p.located(file) for p in problems]
        if not self.problems:
            raise ValueError("WorkflowError needs at least one problem")
        super().__init__(self._text())

    @property
    def file(self) -> str | None:
        return self.problems[0].file

    def located(self, file: str) -> WorkflowError:
        return WorkflowError(self.problems, file=file)

    def summary(self) -> str:
        """A compact text: node-type problems folded into one line per kind (``X (nodes 1, 2), Y (node 3)``),
        every other problem on its own line."""
        by_kind: dict[str, dict[str, list[str]]] = {}
        lines: list[str] = []
        for problem in self.problems:
            if problem.kind in _NODE_TYPE_KINDS and problem.class_type and problem.node_id is not None:
                by_kind.setdefault(problem.kind, {}).setdefault(problem.class_type, []).append(problem.node_id)
            else:
                lines.append(str(problem))
        prefix = f"{self.file}: " if self.file else ""
        for kind, intro in _NODE_TYPE_KINDS.items():
            if kind in by_kind:
                listing = ", ".join(
                    f"{class_type} (node{'s' if len(ids) > 1 else ''} {', '.join(ids)})"
                    for class_type, ids in sorted(by_kind[kind].items())
                )
                lines.insert(0, f"{prefix}{intro}: {listing}")
        return "\n".join(lines)

    def _text(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ProblemCollector:
    """Gathers problems while a pass walks a whole workflow, then raises them together."""

    def __init__(self, file: str | None = None):
        self.file = file
        self.problems: list[Problem] = []

    def add(self, message: str, kind: str = "invalid_workflow", **where: str | None) -> None:
        self.problems.append(Problem(message, kind, file=self.file, **where))

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(p.located(self.file) for p in problems)

    def raise_if_any(self) -> None:
        if self.problems:
            raise WorkflowError(self.problems)
