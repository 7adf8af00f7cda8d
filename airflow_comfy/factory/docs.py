"""The DAG's ``doc_md``: what the workflow is, its groups, their nodes, and what crosses between them."""

from __future__ import annotations

from airflow_comfy.factory.sidecar import Sidecar
from airflow_comfy.workflow.params import ParamDef
from airflow_comfy.workflow.slicing import GroupGraph

_MODE_TEXT = {
    "sidecar": "groups assigned in the sidecar",
    "ui-groups": "the workflow's UI groups",
    "stages": "automatic stages around the sampler",
    "single": "one group (slicing: single)",
}


def workflow_doc_md(graph: GroupGraph, params: list[ParamDef], sidecar: Sidecar) -> str:
    wf = graph.workflow
    lines = [f"# ComfyUI workflow `{wf.name}`", ""]
    if sidecar.description:
        lines += [sidecar.description, ""]
    lines += [
        f"Source: `{wf.source}` ({wf.format.upper()} format, {len(wf.nodes)} nodes that run). "
        f"Sliced by {_MODE_TEXT.get(graph.mode, graph.mode)} into {len(graph.groups)} task(s).",
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
