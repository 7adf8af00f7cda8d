"""``load_workflows``: every ComfyUI workflow JSON in a folder becomes a DAG.

Used from the two-line stub in the dags folder::

    from airflow_comfy import load_workflows  # airflow DAG loader: keep the words "airflow" and "dag" here
    load_workflows(globals_dict=globals())

Error isolation: a workflow that cannot become a DAG never hides the others. The good DAGs are placed in
the stub's globals; every bad file's error (file, node id, class type, input) is

* emitted as a warning (captured per file by the DagBag), and
* reported as an **import error of the loader file** in the Airflow UI. Airflow validates each DAG of a file
  separately and records a failing one as the file's import error while still loading the others
  (``DagBag`` bags DAGs one by one); a sentinel DAG whose ``validate()`` raises the combined message uses
  exactly that mechanism.
"""

from __future__ import annotations

import logging
import traceback
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param

from airflow_comfy.config import ComfySettings, get_settings
from airflow_comfy.factory.cache import CompileCache
from airflow_comfy.factory.compile import CompiledWorkflow, cache_key, compile_workflow, dag_id_for
from airflow_comfy.factory.sidecar import Sidecar, load_sidecar, sidecar_path
from airflow_comfy.operators.build import build_group_task
from airflow_comfy.operators.task_config import GroupTaskConfig
from airflow_comfy.scheduling.tiers import priority_weight
from airflow_comfy.workflow.catalog import Catalog, load_catalog
from airflow_comfy.workflow.errors import Problem, WorkflowError
from airflow_comfy.workflow.groupspec import GroupSpec

log = logging.getLogger(__name__)

DEFAULT_START_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
SKIPPED_SUFFIXES = (".object_info.json",)


class ComfyWorkflowWarning(UserWarning):
    """A workflow file in the workflows folder could not become a DAG."""


class ComfyWorkflowImportError(Exception):
    """Raised by the sentinel DAG so that Airflow records bad workflows as the loader file's import error."""


class _InvalidWorkflowsDag(DAG):
    """Never runs: Airflow calls ``validate()`` before accepting a DAG, and this one refuses with the list of
    workflow files that could not be loaded, which Airflow then shows as the loader file's import error."""

    def validate(self) -> None:  # type: ignore[override]
        raise ComfyWorkflowImportError(self.description)


def load_workflows(folder: str | Path | None = None, globals_dict: dict | None = None, *,
                   object_info_files: list[str] | None = None, settings: ComfySettings | None = None,
                   ) -> dict[str, DAG]:
    """Build one DAG per ``*.json`` workflow in ``folder`` (default: ``[comfy] workflows_folder``, else the
    folder of the calling stub). Returns ``{dag_id: DAG}``; with ``globals_dict``, also places them there."""
    settings = settings or get_settings()
    folder = _resolve_folder(folder, globals_dict, settings)
    errors: list[WorkflowError] = []
    dags: dict[str, DAG] = {}
    try:
        catalog = load_catalog([*settings.object_info_files, *(object_info_files or [])])
    except WorkflowError as exc:
        catalog, errors = None, [exc]
    files = _workflow_files(folder, errors)
    cache = CompileCache(settings.cache_dir or None)
    claimed: dict[str, Path] = {}
    for path in files if catalog is not None else []:
        try:
            dag = _load_one(path, catalog, cache, settings, claimed)
        except WorkflowError as exc:
            errors.append(exc.located(str(path)) if not exc.file else exc)
        except Exception as exc:  # a bug of ours must not hide the other workflows either
            log.exception("airflow-comfy: internal error while loading %s", path)
            errors.append(WorkflowError(Problem(
                f"internal error ({type(exc).__name__}: {exc}); please report it with this traceback:\n"
                f"{traceback.format_exc(limit=-3)}", "internal_error", file=str(path))))
        else:
            dags[dag.dag_id] = dag
    if globals_dict is not None:
        for dag_id, dag in dags.items():
            globals_dict[f"comfy_dag__{dag_id}"] = dag
    if errors:
        _report(errors, folder, globals_dict)
    return dags


def _resolve_folder(folder: str | Path | None, globals_dict: dict | None, settings: ComfySettings) -> Path:
    if folder:
        return Path(folder)
    if settings.workflows_folder:
        return Path(settings.workflows_folder)
    if globals_dict and globals_dict.get("__file__"):
        return Path(globals_dict["__file__"]).resolve().parent
    raise ValueError("load_workflows needs a folder, [comfy] workflows_folder, or globals_dict=globals()")


def _workflow_files(folder: Path, errors: list[WorkflowError]) -> list[Path]:
    if not folder.is_dir():
        errors.append(WorkflowError(Problem("workflows folder does not exist", "missing_folder", file=str(folder))))
        return []
    return sorted(p for p in folder.glob("*.json") if p.is_file() and not p.name.endswith(SKIPPED_SUFFIXES))


def _load_one(path: Path, catalog: Catalog, cache: CompileCache, settings: ComfySettings,
              claimed: dict[str, Path]) -> DAG:
    sidecar = load_sidecar(sidecar_path(path))
    dag_id = dag_id_for(path, sidecar)
    if dag_id in claimed:
        raise WorkflowError(Problem(
            f"dag id {dag_id!r} is already used by {claimed[dag_id].name}; rename one file or set dag_id in its "
            "sidecar", "dag_id_collision", file=str(path)))
    size = path.stat().st_size
    if size > settings.max_workflow_bytes:
        raise WorkflowError(Problem(
            f"file is {size} bytes, over the limit of {settings.max_workflow_bytes} ([comfy] max_workflow_bytes)",
            "too_large", file=str(path)))
    content = path.read_bytes()
    key = cache_key(content, sidecar, catalog, str(path))
    cached = cache.get(key)
    if cached is not None:
        compiled = CompiledWorkflow.from_dict(cached)
    else:
        compiled = compile_workflow(path, content, sidecar, catalog, max_nodes=settings.max_workflow_nodes)
        cache.put(key, compiled.to_dict())
    dag = build_dag(compiled, sidecar, settings)
    claimed[dag_id] = path  # only a file that made a DAG claims its id: a broken file never blocks a good one
    return dag


def build_dag(compiled: CompiledWorkflow, sidecar: Sidecar, settings: ComfySettings) -> DAG:
    task_ids = [g["task_id"] for g in compiled.groups]
    unknown = sorted(set(sidecar.tasks) - set(task_ids))
    if unknown:
        raise WorkflowError(Problem(
            f"sidecar: tasks {', '.join(map(repr, unknown))} do not exist; the workflow's tasks are "
            f"{', '.join(task_ids)}", "bad_sidecar", file=sidecar.path))
    dag = DAG(
        dag_id=compiled.dag_id,
        schedule=sidecar.schedule,
        start_date=_start_date(sidecar),
        catchup=sidecar.catchup,
        description=sidecar.description or f"ComfyUI workflow {compiled.name}",
        doc_md=compiled.doc_md,
        tags=sorted({"comfyui", *sidecar.tags}),
        params={p["name"]: _param(p) for p in compiled.params},
        default_args={"owner": sidecar.owner or "airflow"},
        max_active_runs=sidecar.max_active_runs or 16,
    )
    tasks = {}
    for group in compiled.groups:
        tasks[group["task_id"]] = build_group_task(
            GroupSpec.from_dict(group["spec"]),
            task_config=task_config_for(sidecar, group["task_id"], settings),
            settings=settings,
            upstream_task_ids=group["upstream"],
            dag=dag,
            spec_uri=group["spec_uri"],
        )
    for group in compiled.groups:
        for upstream in group["upstream"]:
            tasks[upstream] >> tasks[group["task_id"]]
    return dag


def task_config_for(sidecar: Sidecar, task_id: str, settings: ComfySettings) -> GroupTaskConfig:
    s = sidecar.task_settings(task_id)
    return GroupTaskConfig(
        backend=s.get("backend", settings.backend),
        image=s.get("image"),
        pool=s.get("pool"),
        pool_slots=s.get("pool_slots", 1),
        priority_weight=priority_weight(s.get("priority"), s.get("priority_weight")),
        retries=s.get("retries", 0),
        retry_delay_seconds=s.get("retry_delay", 60.0),
        retry_exponential_backoff=bool(s.get("retry_exponential_backoff", False)),
        execution_timeout_seconds=s.get("execution_timeout"),
        resources=s.get("resources"),
        node_selector={str(k): str(v) for k, v in (s.get("node_selector") or {}).items()},
        tolerations=tuple(dict(t) for t in s.get("tolerations") or ()),
        affinity=s.get("affinity"),
        priority_class_name=s.get("priority_class_name"),
        env={str(k): str(v) for k, v in (s.get("env") or {}).items()},
    )


def _start_date(sidecar: Sidecar) -> datetime | None:
    if sidecar.start_date:
        try:
            value = datetime.fromisoformat(sidecar.start_date)
        except ValueError as exc:
            raise WorkflowError(Problem(f"sidecar: start_date {sidecar.start_date!r} is not an ISO date",
                                        "bad_sidecar", file=sidecar.path)) from exc
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return DEFAULT_START_DATE if sidecar.schedule else None


def _param(p: dict[str, Any]) -> Param:
    return Param(p["default"], title=p["title"], description=p["description"], **p["schema"])


def _report(errors: list[WorkflowError], folder: Path, globals_dict: dict | None) -> None:
    for error in errors:
        warnings.warn(error.summary(), ComfyWorkflowWarning, stacklevel=4)
    if globals_dict is None:
        return
    files = sorted({e.file or str(folder) for e in errors})
    text = (f"airflow-comfy: {len(files)} workflow file(s) in {folder} could not become DAGs "
            "(the other workflows loaded):\n\n" + "\n\n".join(e.summary() for e in errors))
    globals_dict["comfy_workflow_errors"] = _InvalidWorkflowsDag(
        dag_id="airflow_comfy_workflow_errors", schedule=None, description=text,
        default_args={"retry_delay": timedelta(seconds=0)},
    )
