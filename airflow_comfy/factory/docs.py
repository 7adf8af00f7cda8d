"""The DAG's ``doc_md``: what the workflow is, where its file is, its groups as a diagram (which nodes, what
crosses each edge), then the same as tables, and the trigger params.

Airflow 3.3's docs panel renders Markdown (GitHub tables and fenced code; raw HTML is skipped, and there is no
mermaid), so the diagram is a fenced text block: one box per group in task order, and under it an arrow per
value it hands to a later group, naming the value's type, the node that makes it and the node input that reads
it. Airflow's *Code* tab shows the DAG's Python file, which for these DAGs is the loader stub, so the docs say
where the workflow JSON (and its sidecar) is and link to the gallery plugin's route that serves it
(:func:`airflow_comfy.gallery.urls.workflow_file_url`, which finds the file from the ``Source:`` line written
here: :func:`workflow_source_of`).
"""

from __future__ import annotations

import re
from pathlib import PurePath

from airflow_comfy.factory.sidecar import Sidecar
from airflow_comfy.gallery.urls import workflow_file_url
from airflow_comfy.workflow.graph import Link, Workflow
from airflow_comfy.workflow.groupspec import BoundaryValue
from airflow_comfy.workflow.params import ParamDef
from airflow_comfy.workflow.slicing import Group, GroupGraph

#: Width the diagram's node lists are wrapped at (the docs panel shows code in a monospace box).
_DIAGRAM_WIDTH = 96

#: The docs' line naming the workflow file: written by :func:`workflow_doc_md`, read by :func:`workflow_source_of`.
_SOURCE_LINE = re.compile(r"^Source: `(?P<source>[^`\n]+)` \(", re.MULTILINE)

_MODE_TEXT = {
    "sidecar": "groups assigned in the sidecar",
    "ui-groups": "the workflow's UI groups",
    "stages": "automatic stages around the sampler",
    "single": "one group (slicing: single)",
}


def workflow_doc_md(graph: GroupGraph, params: list[ParamDef], sidecar: Sidecar, *, dag_id: str,
                    ui_base: str = "") -> str:
    """The DAG's docs. ``ui_base``: the path the Airflow UI is served under (``[api] base_url``'s path, "" at
    the host's root): the links to the workflow file are relative to the UI's origin."""
    wf = graph.workflow
    lines = [f"# ComfyUI workflow `{wf.name}`", ""]
    if sidecar.description:
        lines += [sidecar.description, ""]
    lines += [
        f"Source: `{wf.source}` ({wf.format.upper()} format, {len(wf.nodes)} nodes that run). "
        f"Sliced by {_MODE_TEXT.get(graph.mode, graph.mode)} into {len(graph.groups)} task(s).",
        "",
        _file_note(wf.source, sidecar, dag_id, ui_base),
        "",
        "## Diagram",
        "",
        "```text",
        *group_diagram(graph),
        "```",
        "",
        "## Groups",
        "",
        "| task | nodes | replays (models) | reads from |",
        "|---|---|---|---|",
    ]
    for group in graph.groups:
        nodes = ", ".join(f"{n} {wf.nodes[n].class_type}" for n in group.nodes)
        recipes = ", ".join(
            f"{n} {wf.nodes[n].class_type} [{'/'.join(group.components.get(n, []))}]" for n in group.recipe_nodes
        ) or "-"
        upstream = ", ".join(f"`{u}`" for u in group.upstream) or "-"
        lines.append(f"| `{group.name}` | {_cell(nodes)} | {_cell(recipes)} | {upstream} |")
    if graph.edges:
        lines += ["", "## What crosses between groups", "", "| from | to | values |", "|---|---|---|"]
        for edge in graph.edges:
            values = ", ".join(f"{v.type} (node {v.node} output {v.output})" for v in edge.values)
            lines.append(f"| `{edge.source}` | `{edge.target}` | {values} |")
    if params:
        lines += ["", "## Trigger params", "", "| param | sets | default |", "|---|---|---|"]
        for p in params:
            sets = ", ".join(f"node {b.node} `{b.input}`" for b in p.bindings)
            lines.append(f"| `{p.name}` | {sets} | {_cell(repr(p.default))} |")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 300) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def workflow_source_of(doc_md: str) -> str | None:
    """The workflow file's path as the docs of a workflow DAG name it; None when the docs name none."""
    match = _SOURCE_LINE.search(doc_md or "")
    return match.group("source") if match else None


def _file_note(source: str, sidecar: Sidecar, dag_id: str, ui_base: str) -> str:
    name = PurePath(source).name
    link = f"[{_link_text(name)}]({workflow_file_url(ui_base, dag_id)})"
    side = ""
    if sidecar.path:
        side_name = PurePath(sidecar.path).name
        side = (f" and its sidecar [{_link_text(side_name)}]({workflow_file_url(ui_base, dag_id, sidecar=True)})"
                f" (`{side_name}`)")
    return (f"**Workflow file:** {link} (`{name}`){side} in the workflows folder (`{PurePath(source).parent}`). "
            "The *Code* tab shows the loader stub that builds this DAG from it, not the workflow: open the JSON "
            "in ComfyUI to edit it; the DAG follows at the next parse.")


def _link_text(name: str) -> str:
    """A file name as a Markdown link's text (brackets and backslashes escaped)."""
    return re.sub(r"([\\\[\]])", r"\\\1", name)


def group_diagram(graph: GroupGraph) -> list[str]:
    """The groups as boxes in task order; under each, one arrow per value a later group reads from it."""
    wf = graph.workflow
    lines: list[str] = []
    for group in graph.groups:
        outgoing = [(edge.target, value) for edge in graph.edges if edge.source == group.name
                    for value in edge.values]
        lines += _box(group, wf, bool(outgoing))
        for index, (target, value) in enumerate(outgoing):
            branch = "└" if index == len(outgoing) - 1 else "├"
            lines.append(f"  {branch}─▶ {target}: {_value_text(value, graph.groups, target, wf)}")
        lines.append("")
    return lines[:-1]


def _box(group: Group, wf: Workflow, has_edges: bool) -> list[str]:
    title = f"┌─ {group.name} " + ("─" * max(3, 40 - len(group.name)))
    body = _wrap(" · ".join(f"{n} {wf.nodes[n].class_type}" for n in group.nodes))
    if group.recipe_nodes:
        replays = ", ".join(f"{n} {wf.nodes[n].class_type} ({'/'.join(group.components.get(n, [])) or '-'})"
                            for n in group.recipe_nodes)
        body += _wrap(f"replays {replays}")
    bottom = "└─┬" if has_edges else "└──"
    return [title, *(f"│ {line}" for line in body), bottom.ljust(len(title), "─")]


def _value_text(value: BoundaryValue, groups: list[Group], target: str, wf: Workflow) -> str:
    """``LATENT 12 VAEEncode → 13 KSampler.latent_image``: the type, its maker, the inputs that read it."""
    maker = wf.nodes[value.node].class_type if value.node in wf.nodes else "?"
    readers = [f"{nid} {wf.nodes[nid].class_type}.{name}"
               for g in groups if g.name == target for nid in g.nodes
               for name, link in wf.nodes[nid].inputs.items()
               if isinstance(link, Link) and (link.node, link.output) == (value.node, value.output)]
    output = f" output {value.output}" if value.output else ""
    return f"{value.type} {value.node} {maker}{output} → {', '.join(readers) or target}"


def _wrap(text: str) -> list[str]:
    lines, current = [], ""
    for word in text.split(" "):
        if current and len(current) + 1 + len(word) > _DIAGRAM_WIDTH:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current] if current else lines
