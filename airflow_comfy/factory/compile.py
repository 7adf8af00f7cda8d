"""Workflow file + sidecar -> a compiled, JSON-able description of the DAG to build.

This is the expensive part of parsing (load, convert, validate, slice, discover params, describe) and it
depends only on the file's path (its name gives the dag id; the path is quoted in docs and specs), its
contents, the sidecar, the node catalog and the package version, so its result is cached by those (see
:mod:`airflow_comfy.factory.cache`). Building the Airflow objects from it is cheap.
No Airflow import here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_comfy.factory.docs import workflow_doc_md
from airflow_comfy.factory.sidecar import Sidecar
from airflow_comfy.version import __version__
from airflow_comfy.workflow.catalog import Catalog
from airflow_comfy.workflow.loader import parse_workflow_text
from airflow_comfy.workflow.params import bindings, discover_params
from airflow_comfy.workflow.slicing import slice_workflow
from airflow_comfy.workflow.validate import validate

_DAG_ID_RE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class CompiledWorkflow:
    dag_id: str
    name: str
    source: str
    sha256: str
    mode: str
    groups: list[dict[str, Any]]
    """``{"task_id", "title", "upstream": [...], "spec": GroupSpec dict, "spec_sha256": of its bytes}`` in
    topological order."""
    params: list[dict[str, Any]]
    doc_md: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompiledWorkflow:
        return cls(**data)


def dag_id_for(path: Path, sidecar: Sidecar) -> str:
    """The file name without ``.json``, made a valid dag id (letters, digits, ``_ . -``)."""
    if sidecar.dag_id:
        return sidecar.dag_id
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.stem
    return _DAG_ID_RE.sub("_", stem.strip()).strip("_") or "workflow"


def cache_key(content: bytes, sidecar: Sidecar, catalog: Catalog, source: str = "", context: str = "") -> str:
    """Key of a compiled workflow. ``source`` is the file's path: the compiled result names it and carries the
    dag id made from it, so two files with the same bytes (a copied template) must not share an entry.
    ``context``: anything else the result depends on (the loader passes the settings and Airflow's version)."""
    digest = hashlib.sha256()
    for part in (source.encode(), content, sidecar.raw_text.encode(), catalog.fingerprint().encode(),
                 __version__.encode(), context.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def compile_workflow(path: Path, content: bytes, sidecar: Sidecar, catalog: Catalog, *,
                     max_nodes: int, ui_base: str = "") -> CompiledWorkflow:
    """``ui_base``: the path the Airflow UI is served under, for the docs' links (the loader puts it in the cache
    key's context)."""
    source = str(path)
    name = path.name[: -len(".json")] if path.name.endswith(".json") else path.stem
    workflow = parse_workflow_text(content, catalog, name=name, source=source, max_nodes=max_nodes)
    workflow = validate(workflow, catalog)
    graph = slice_workflow(workflow, catalog, mode=sidecar.slicing, assignment=sidecar.groups or None)
    params = discover_params(workflow, catalog, auto=sidecar.auto_params, declared=sidecar.params)
    sha = hashlib.sha256(content).hexdigest()
    metadata = {"prompt": workflow.to_api(), "workflow": workflow.ui_workflow}
    specs = graph.specs(workflow_sha256=sha, params=bindings(params), metadata=metadata)
    dag_id = dag_id_for(path, sidecar)
    return CompiledWorkflow(
        dag_id=dag_id,
        name=name,
        source=source,
        sha256=sha,
        mode=graph.mode,
        groups=[{"task_id": s.group, "title": g.title, "upstream": list(s.upstream), "spec": s.to_dict(),
                 "spec_sha256": s.sha256()}
                for s, g in zip(specs, graph.groups, strict=True)],
        params=[{"name": p.name, "title": p.title, "description": p.description, "schema": p.schema,
                 "default": p.default} for p in params],
        doc_md=workflow_doc_md(graph, params, sidecar, dag_id=dag_id, ui_base=ui_base),
    )
