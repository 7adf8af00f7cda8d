"""The two loader stubs of the dags folder: every ComfyUI workflow JSON in a folder becomes a DAG, and every
file that cannot become one is reported as an import error, without hiding any other workflow.

Users copy two files from ``dags/`` into their dags folder::

    # comfy_workflows.py: the airflow DAG factory (keep the words "airflow" and "dag" in a stub)
    from airflow_comfy import load_workflows
    load_workflows(globals_dict=globals())

    # comfy_workflow_errors.py: no DAG here; the airflow import error that names every bad workflow
    from airflow_comfy import report_workflow_errors
    report_workflow_errors(globals_dict=globals())

Why two files: when a file has an import error, Airflow's dag-processor marks **every DAG of that file**
stale (``_update_import_errors`` in ``airflow/dag_processing/collection.py``, Airflow 3.3), so the file that
builds the DAGs must never end in an import error. :func:`load_workflows` therefore never raises for a bad
workflow: it builds the good ones and only warns about the others. :func:`report_workflow_errors` defines no
DAG and raises one :class:`ComfyWorkflowImportError` naming every bad file (file, node id, class type,
input), which Airflow shows as that file's import error; an import error on a file without DAGs hides
nothing. Both scan the same folder in the same order with the same rules, so a file is either a DAG of the
first stub or a block of the second stub's error, never both and never neither.

A workflow edited into a bad one loses its DAG (Airflow deactivates it, its runs and logs stay in the
metadata database) and shows in the import error until it is fixed, when the DAG comes back: the same as a
Python DAG file that stops importing.

What each file became is cached by content (:mod:`airflow_comfy.factory.cache`): the building stub keeps the
compiled workflow and rebuilds only the Airflow objects, the error stub reads only the verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import stat
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airflow.sdk import DAG, Param

from airflow_comfy.config import ComfySettings, get_settings
from airflow_comfy.factory.cache import ParseCache
from airflow_comfy.factory.compile import CompiledWorkflow, cache_key, compile_workflow, dag_id_for
from airflow_comfy.factory.param_formats import register_param_formats
from airflow_comfy.factory.sidecar import Sidecar, load_sidecar, sidecar_path
from airflow_comfy.operators.build import build_group_task
from airflow_comfy.operators.task_config import GroupTaskConfig
from airflow_comfy.scheduling.pools import (
    PoolsConfig,
    assign_pool,
    check_pool_name,
    load_pools,
    mentions_gpu,
    merge_resources,
    merge_tolerations,
)
from airflow_comfy.scheduling.tiers import TIER_PARAM, priority_class_template, tier_param
from airflow_comfy.workflow.catalog import Catalog, load_catalog
from airflow_comfy.workflow.errors import Problem, WorkflowError
from airflow_comfy.workflow.groupspec import GroupSpec
from airflow_comfy.workflow.loader import read_workflow_file

log = logging.getLogger(__name__)

register_param_formats()  # a task validating its params (and dag.test()) gets the sentences too

DEFAULT_START_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
SKIPPED_SUFFIXES = (".object_info.json",)
#: What a sampling group's pod asks for when no declared pool gives it a GPU and its sidecar names none.
DEFAULT_SAMPLING_GPU = {"limits": {"nvidia.com/gpu": "1"}}


class ComfyWorkflowWarning(UserWarning):
    """A workflow file in the workflows folder could not become a DAG."""


class ComfyWorkflowImportError(Exception):
    """Raised by the error stub: Airflow shows it as that file's import error."""

    __module__ = "airflow_comfy"  # how the UI's import error names it


@dataclass
class FolderScan:
    """What the two stubs make of one workflows folder."""

    folder: Path
    dags: dict[str, DAG] = field(default_factory=dict)
    """Built DAGs by dag id (only when the scan builds them)."""
    good: dict[str, Path] = field(default_factory=dict)
    """dag id -> the workflow file that makes it."""
    errors: list[WorkflowError] = field(default_factory=list)

    def import_error_text(self) -> str:
        files = sorted({e.file or str(self.folder) for e in self.errors})
        return (f"airflow-comfy: {len(files)} workflow file(s) in {self.folder} could not become DAGs "
                "(the other workflows loaded):\n\n" + "\n\n".join(e.summary() for e in self.errors))


def load_workflows(folder: str | Path | None = None, globals_dict: dict | None = None, *,
                   object_info_files: list[str] | None = None, settings: ComfySettings | None = None,
                   ) -> dict[str, DAG]:
    """The building stub: one DAG per good ``*.json`` workflow in ``folder`` (default: ``[comfy]
    workflows_folder``, else the calling stub's folder). Returns ``{dag_id: DAG}``; with ``globals_dict``,
    also places them there. Never raises for a bad workflow: each is a warning here and a block of
    the error stub's import error."""
    settings = settings or get_settings()
    scan = scan_workflows(_resolve_folder(folder, globals_dict, settings), settings,
                          object_info_files=object_info_files, build=True)
    if globals_dict is not None:
        for dag_id, dag in scan.dags.items():
            globals_dict[f"comfy_dag__{dag_id}"] = dag
    for error in scan.errors:
        warnings.warn(error.summary(), ComfyWorkflowWarning, stacklevel=2)
    return scan.dags


def find_workflow_errors(folder: str | Path | None = None, globals_dict: dict | None = None, *,
                         object_info_files: list[str] | None = None, settings: ComfySettings | None = None,
                         ) -> FolderScan:
    """What the error stub reports: the workflows of ``folder`` that cannot become DAGs, found as
    :func:`load_workflows` finds them, without building the DAGs whose files the cache already knows as good.
    :func:`airflow_comfy.report_workflow_errors` raises :class:`ComfyWorkflowImportError` from it."""
    settings = settings or get_settings()
    return scan_workflows(_resolve_folder(folder, globals_dict, settings), settings,
                          object_info_files=object_info_files, build=False)


def scan_workflows(folder: Path, settings: ComfySettings, *, object_info_files: list[str] | None = None,
                   build: bool = True) -> FolderScan:
    """Every workflow of ``folder`` in name order: a DAG (built when ``build``; otherwise only checked, from
    the cache's verdict where it has one) or an error. Never raises."""
    scan = FolderScan(folder)
    try:
        catalog = load_catalog([*settings.object_info_files, *(object_info_files or [])])
        pools = load_pools(settings.pools_file)
    except WorkflowError as exc:
        scan.errors.append(exc)
        return scan
    cache = ParseCache(settings.cache_dir or None, folder)
    context = _build_context(settings, pools)
    used_keys: set[str] = set()
    for path in _workflow_files(folder, scan.errors):
        try:
            dag_id, dag = _scan_one(path, catalog, cache, settings, pools, context, scan.good, used_keys, build)
        except WorkflowError as exc:
            scan.errors.append(exc.located(str(path)) if not exc.file else exc)
        except Exception as exc:  # a bug of ours must not hide the other workflows either
            log.exception("airflow-comfy: internal error while loading %s", path)
            scan.errors.append(_internal_error(path, exc))
        else:
            scan.good[dag_id] = path
            if dag is not None:
                scan.dags[dag_id] = dag
    if build:
        cache.prune(used_keys)
    return scan


def _scan_one(path: Path, catalog: Catalog, cache: ParseCache, settings: ComfySettings, pools: PoolsConfig,
              context: str, claimed: dict[str, Path], used_keys: set[str], build: bool) -> tuple[str, DAG | None]:
    sidecar = load_sidecar(sidecar_path(path))
    dag_id = dag_id_for(path, sidecar)
    content = read_workflow_file(path, settings.max_workflow_bytes, limit_setting="[comfy] max_workflow_bytes")
    key = cache_key(content, sidecar, catalog, str(path), context)
    used_keys.add(key)
    try:
        if build:
            return dag_id, _build_file(path, content, key, sidecar, catalog, cache, settings, pools, claimed)
        _check_file(path, content, key, sidecar, catalog, cache, settings, pools, claimed)
        return dag_id, None
    except WorkflowError as exc:
        # a collision depends on the folder, not on this file; a cached verdict is already written
        if exc.problems[0].kind != "dag_id_collision" and not getattr(exc, "from_cache", False):
            cache.put_verdict(key, exc.located(str(path)) if not exc.file else exc)
        raise


def _build_file(path: Path, content: bytes, key: str, sidecar: Sidecar, catalog: Catalog, cache: ParseCache,
                settings: ComfySettings, pools: PoolsConfig, claimed: dict[str, Path]) -> DAG:
    """The building stub's way: the compiled workflow from the cache (a file known to be bad is not compiled
    again), then the DAG; the verdict is written the first time."""
    cached = cache.compiled(key)
    if cached is None:
        _raise_known_error(cache, key)
        compiled = compile_workflow(path, content, sidecar, catalog, max_nodes=settings.max_workflow_nodes,
                                    ui_base=ui_base_path())
        cache.put_compiled(key, compiled.to_dict())
    else:
        compiled = CompiledWorkflow.from_dict(cached)
    _claim(compiled.dag_id, path, claimed)
    dag = build_dag(compiled, sidecar, settings, pools=pools)
    if not cache.has_verdict(key):
        cache.put_verdict(key, True)
    return dag


def _check_file(path: Path, content: bytes, key: str, sidecar: Sidecar, catalog: Catalog, cache: ParseCache,
                settings: ComfySettings, pools: PoolsConfig, claimed: dict[str, Path]) -> None:
    """The error stub's way: the verdict when there is one; else compile the file (or take the building stub's
    compiled workflow) and check everything the DAG is built from but the operators themselves, whose
    construction the building stub's verdict covers from its next parse on. Without a cache there is no
    verdict to wait for, so the whole DAG is built."""
    if _raise_known_error(cache, key):
        _claim(dag_id_for(path, sidecar), path, claimed)
        return
    cached = cache.compiled(key)
    if cached is None:
        compiled = compile_workflow(path, content, sidecar, catalog, max_nodes=settings.max_workflow_nodes,
                                    ui_base=ui_base_path())
        cache.put_compiled(key, compiled.to_dict())
    else:
        compiled = CompiledWorkflow.from_dict(cached)
    _claim(compiled.dag_id, path, claimed)
    if cache.root is None:
        build_dag(compiled, sidecar, settings, pools=pools)
    else:
        plan_dag(compiled, sidecar, settings, pools=pools)


def _raise_known_error(cache: ParseCache, key: str) -> bool:
    """Raise the cached error of a file known to be bad; True when the file is known to be good."""
    verdict = cache.verdict(key)
    if isinstance(verdict, WorkflowError):
        verdict.from_cache = True
        raise verdict
    return verdict is True


def _claim(dag_id: str, path: Path, claimed: dict[str, Path]) -> None:
    """Only a file that makes a DAG claims its id, in name order: a broken file never blocks a good one."""
    if dag_id in claimed:
        raise WorkflowError(Problem(
            f"dag id {dag_id!r} is already used by {claimed[dag_id].name}; rename one file or set dag_id in its "
            "sidecar", "dag_id_collision", file=str(path)))


def _build_context(settings: ComfySettings, pools: PoolsConfig) -> str:
    """What besides the file decides whether and how it builds: the settings, the pools file's content,
    Airflow's version and the UI's path (the docs link to it)."""
    from airflow import __version__ as airflow_version

    return hashlib.sha256(repr((dataclasses.astuple(settings), pools.digest, airflow_version,
                                ui_base_path())).encode()).hexdigest()


def ui_base_path() -> str:
    """The path the Airflow UI is served under: ``[api] base_url``'s path ("" when unset or at the host's root).
    The DAG docs link to the workflow file relative to the UI's origin, so the link works whatever host name
    the browser uses."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def _resolve_folder(folder: str | Path | None, globals_dict: dict | None, settings: ComfySettings) -> Path:
    if folder:
        return Path(folder)
    if settings.workflows_folder:
        return Path(settings.workflows_folder)
    if globals_dict and globals_dict.get("__file__"):
        return Path(globals_dict["__file__"]).resolve().parent
    raise ValueError("load_workflows needs a folder, [comfy] workflows_folder, or globals_dict=globals()")


def _workflow_files(folder: Path, errors: list[WorkflowError]) -> list[Path]:
    """The folder's ``*.json`` workflow files in name order. Folders are skipped; anything else that is not
    a readable regular file (a dangling link, a device, a FIFO) is an error, never silently dropped."""
    try:
        entries = sorted(folder.glob("*.json"))
    except OSError as exc:
        errors.append(WorkflowError(Problem(f"cannot list the workflows folder: {exc.strerror or exc}",
                                            "missing_folder", file=str(folder))))
        return []
    if not entries and not folder.is_dir():
        errors.append(WorkflowError(Problem("workflows folder does not exist", "missing_folder", file=str(folder))))
    files = []
    for path in entries:
        if path.name.endswith(SKIPPED_SUFFIXES):
            continue
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            errors.append(WorkflowError(Problem(f"cannot read the file: {exc.strerror or exc}", "unreadable",
                                                file=str(path))))
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            errors.append(WorkflowError(Problem("not a regular file (a device, socket or FIFO is never read)",
                                                "unreadable", file=str(path))))
            continue
        files.append(path)
    return files


def _internal_error(path: Path, exc: Exception) -> WorkflowError:
    return WorkflowError(Problem(
        f"internal error ({type(exc).__name__}: {exc}); please report it with this traceback:\n"
        f"{traceback.format_exc(limit=-3)}", "internal_error", file=str(path)))


@dataclass
class DagPlan:
    """What a DAG is built from, checked: the DAG itself (no tasks yet) and each group's spec and settings."""

    dag: DAG
    tasks: list[tuple[dict[str, Any], GroupSpec, GroupTaskConfig]]
    default_tier: str


def plan_dag(compiled: CompiledWorkflow, sidecar: Sidecar, settings: ComfySettings, *,
             pools: PoolsConfig | None = None) -> DagPlan:
    """Everything :func:`build_dag` needs but the operators: the DAG (schedule, start date, tags ... checked by
    Airflow's own constructor) and the task settings of every group (sidecar over pool)."""
    if pools is None:
        pools = load_pools(settings.pools_file)
    task_ids = [g["task_id"] for g in compiled.groups]
    unknown = sorted(set(sidecar.tasks) - set(task_ids))
    if unknown:
        raise WorkflowError(Problem(
            f"sidecar: tasks {', '.join(map(repr, unknown))} do not exist; the workflow's tasks are "
            f"{', '.join(task_ids)}", "bad_sidecar", file=sidecar.path))
    tiers = settings.tier_weights
    default_tier = sidecar.priority or settings.default_tier
    if default_tier not in tiers:
        raise WorkflowError(Problem(
            f"sidecar: priority {default_tier!r} is not a tier; the tiers ([comfy] tiers) are {', '.join(tiers)}",
            "bad_sidecar", file=sidecar.path))
    if any(p["name"] == TIER_PARAM for p in compiled.params):
        raise WorkflowError(Problem(
            f"sidecar: the param name {TIER_PARAM!r} is reserved for the run's priority tier; rename the param",
            "bad_sidecar", file=sidecar.path))
    dag = DAG(
        dag_id=compiled.dag_id,
        schedule=sidecar.schedule,
        start_date=_start_date(sidecar),
        catchup=sidecar.catchup,
        description=sidecar.description or f"ComfyUI workflow {compiled.name}",
        doc_md=compiled.doc_md,
        tags=sorted({"comfyui", *sidecar.tags}),
        default_args={"owner": sidecar.owner or "airflow"},
        **{**_dag_defaults(), **({"max_active_runs": sidecar.max_active_runs} if sidecar.max_active_runs else {})},
    )
    tasks = []
    for group in compiled.groups:
        spec = GroupSpec.from_dict(group["spec"])
        tasks.append((group, spec, task_config_for(sidecar, group["task_id"], settings, spec=spec, pools=pools,
                                                   default_tier=default_tier)))
    return DagPlan(dag, tasks, default_tier)


def build_dag(compiled: CompiledWorkflow, sidecar: Sidecar, settings: ComfySettings, *,
              pools: PoolsConfig | None = None) -> DAG:
    """The DAG of a compiled workflow. ``pools``: the declared pools (default: read from ``[comfy]
    pools_file``)."""
    plan = plan_dag(compiled, sidecar, settings, pools=pools)
    dag = plan.dag
    tasks = {}
    for group, spec, task_config in plan.tasks:
        tasks[group["task_id"]] = build_group_task(
            spec,
            task_config=task_config,
            settings=settings,
            upstream_task_ids=group["upstream"],
            dag=dag,
            spec_sha256=group["spec_sha256"],
        )
    for group in compiled.groups:
        for upstream in group["upstream"]:
            tasks[upstream] >> tasks[group["task_id"]]
    # The trigger params are set once the tasks exist: Airflow deep-copies a DAG's params into every task at each
    # level of the operator's class hierarchy, while a running task gets the DAG's params merged in anyway
    # (``process_params``). Tasks built first carry none: a third of the parse time and most of the
    # serialization time of a DAG, saved.
    # ``tier`` chooses the run's priority tier: the cluster policy (airflow_comfy.scheduling.policy) gives every
    # task instance of the run the tier's weight, and pods render their priority class from it.
    dag.params = {**{p["name"]: _param(p) for p in compiled.params},
                  TIER_PARAM: tier_param(plan.default_tier, settings.tier_weights)}
    return dag


@functools.lru_cache(maxsize=1)
def _dag_defaults() -> dict[str, int]:
    """DAG arguments whose defaults Airflow reads from its configuration for every DAG: read once per parse."""
    from airflow.configuration import conf

    return {
        "max_active_runs": conf.getint("core", "max_active_runs_per_dag"),
        "max_active_tasks": conf.getint("core", "max_active_tasks_per_dag"),
        "max_consecutive_failed_dag_runs": conf.getint("core", "max_consecutive_failed_dag_runs_per_dag"),
    }


def task_config_for(sidecar: Sidecar, task_id: str, settings: ComfySettings, *, spec: GroupSpec | None = None,
                    pools: PoolsConfig | None = None, default_tier: str | None = None) -> GroupTaskConfig:
    """The task settings of group ``task_id``: its sidecar's, on top of its pool's (``spec``'s nodes decide the
    pool by role when the sidecar names none; see :mod:`airflow_comfy.scheduling.pools`). Its priority weight
    is the default tier's (``default_tier``, else the sidecar's ``priority``, else ``[comfy] default_tier``):
    the weight of runs whose trigger chose no tier, and of every run where the policy is not installed; the
    policy sets each run's own."""
    s = sidecar.task_settings(task_id)
    tier = default_tier or sidecar.priority or settings.default_tier
    pools = pools or PoolsConfig()
    backend = s.get("backend", settings.backend)
    if s.get("pool"):
        problem = check_pool_name(s["pool"], pools, settings.default_pool)
        if problem:
            where = f"tasks.{task_id}: " if "pool" in sidecar.tasks.get(task_id, {}) else ""
            raise WorkflowError(Problem(f"sidecar: {where}{problem}", "bad_sidecar", file=sidecar.path))
    placed = assign_pool(spec.nodes if spec is not None else {}, explicit=s.get("pool"), pools=pools,
                         default_pool=settings.default_pool)
    pool = placed.spec
    resources = merge_resources(pool.resources() if pool else None, s.get("resources"))
    if backend == "kubernetes" and placed.role == "sampling" and pool is None and not mentions_gpu(s.get("resources")):
        resources = merge_resources(DEFAULT_SAMPLING_GPU, resources)
    return GroupTaskConfig(
        backend=backend,
        image=s.get("image") or (pool.image if pool else None),
        pool=placed.pool,
        pool_slots=s.get("pool_slots", 1),
        priority_weight=settings.tier_weights[tier],
        retries=s.get("retries", settings.retries),
        retry_delay_seconds=s.get("retry_delay", settings.retry_delay),
        retry_exponential_backoff=_given(s.get("retry_exponential_backoff"), settings.retry_exponential_backoff),
        max_retry_delay_seconds=_given(s.get("max_retry_delay"), settings.max_retry_delay),
        execution_timeout_seconds=_given(s.get("execution_timeout"), settings.execution_timeout),
        resources=resources,
        node_selector={**(pool.node_selector if pool else {}),
                       **{str(k): str(v) for k, v in (s.get("node_selector") or {}).items()}},
        tolerations=merge_tolerations(pool.tolerations if pool else (), s.get("tolerations") or ()),
        runtime_class_name=pool.runtime_class if pool else None,
        affinity=s.get("affinity"),
        priority_class_name=s.get("priority_class_name") or priority_class_template(settings.tier_classes),
        env={str(k): str(v) for k, v in (s.get("env") or {}).items()},
    )


def _given(value: Any, default: Any) -> Any:
    """The sidecar's value, or the ``[comfy]`` default when the sidecar says nothing (or null)."""
    return default if value is None else value


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


