"""What the gallery shows: recent runs that wrote images, read from the metadata database (each group task's
XCom ``return_value`` is its manifest, :mod:`airflow_comfy.artifacts.manifest`), for the DAGs the user may see.

An image is shown only when its URI lies in the run's own folder of the configured artifact store: a manifest
cannot make the gallery serve another run's (or another DAG's) objects. Only imported by the api-server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.store import ArtifactStore
from airflow_comfy.gallery.paths import run_relative_path
from airflow_comfy.scheduling.tiers import TIER_PARAM

#: How many runs a gallery page shows at most.
MAX_RUNS = 100
#: How many runs are looked at per run shown (most runs of a busy deployment may have made no image yet).
_SCAN_FACTOR = 5


@dataclass
class GalleryImage:
    task_id: str
    node: str
    filename: str
    path: str
    """Relative to the run's folder: what the plugin's file and thumbnail routes take."""
    width: int
    height: int


@dataclass
class GalleryTask:
    task_id: str
    seconds: float | None
    """The group's total time as its runner measured it."""
    snapshot: str | None
    """The run snapshot it published beside its images (relative to the run's folder)."""


@dataclass
class GalleryRun:
    dag_id: str
    run_id: str
    state: str
    start_date: str | None
    end_date: str | None
    seconds: float | None
    tier: str | None
    params: dict[str, Any]
    tasks: list[GalleryTask] = field(default_factory=list)
    images: list[GalleryImage] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _manifest(value: Any) -> dict[str, Any] | None:
    from airflow.models.xcom import XComModel

    value = XComModel.deserialize_value(value) if not isinstance(value, dict) else value
    return value if isinstance(value, dict) and value.get("schema") == "airflow-comfy/group-manifest" else None


def _images(manifest: dict[str, Any], task_id: str, dag_id: str, run_id: str,
            store: ArtifactStore) -> list[GalleryImage]:
    found = []
    for image in manifest.get("images") or []:
        try:
            path = run_relative_path(dag_id, run_id, store.key_of(str(image.get("uri", ""))))
        except ValueError:
            path = None
        if path is None:
            continue
        found.append(GalleryImage(task_id=task_id, node=str(image.get("node", "")),
                                  filename=str(image.get("filename", "")), path=path,
                                  width=int(image.get("width") or 0), height=int(image.get("height") or 0)))
    return found


def _task(manifest: dict[str, Any], task_id: str, dag_id: str, run_id: str, has_images: bool) -> GalleryTask:
    timings = manifest.get("timings") or {}
    total = (timings.get("totals") or {}).get("total") if isinstance(timings, dict) else None
    snapshot = None
    if has_images:
        try:
            snapshot = run_relative_path(dag_id, run_id,
                                         layout.snapshot_key(str(manifest["run_key"]), str(manifest["group"])))
        except (KeyError, ValueError):
            snapshot = None
    return GalleryTask(task_id=task_id, seconds=total if isinstance(total, (int, float)) else None,
                       snapshot=snapshot)


def recent_runs(dag_ids: Iterable[str], store: ArtifactStore, *, dag_id: str | None = None,
                run_id: str | None = None, task_id: str | None = None, limit: int = 24) -> list[GalleryRun]:
    """The newest runs (of ``dag_ids``, narrowed by ``dag_id``/``run_id``/``task_id``) whose tasks wrote images."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    allowed = sorted(set(dag_ids) & ({dag_id} if dag_id else set(dag_ids)))
    limit = max(1, min(int(limit), MAX_RUNS))
    if not allowed:
        return []
    with create_session() as session:
        query = select(DagRun).where(DagRun.dag_id.in_(allowed))
        if run_id:
            query = query.where(DagRun.run_id == run_id)
        dag_runs = list(session.scalars(query.order_by(DagRun.id.desc()).limit(limit * _SCAN_FACTOR)))
        xcoms = session.execute(
            select(XComModel.dag_run_id, XComModel.task_id, XComModel.value)
            .where(XComModel.dag_run_id.in_([run.id for run in dag_runs]), XComModel.key == "return_value")
            .order_by(XComModel.task_id)).all() if dag_runs else []
        by_run: dict[int, list[tuple[str, Any]]] = {}
        for dag_run_id, xcom_task_id, value in xcoms:
            if task_id and xcom_task_id != task_id:
                continue
            by_run.setdefault(dag_run_id, []).append((xcom_task_id, value))
        runs = []
        for dag_run in dag_runs:
            run = _gallery_run(dag_run, by_run.get(dag_run.id, []), store)
            if run.images:
                runs.append(run)
            if len(runs) >= limit:
                break
        return runs


def _gallery_run(dag_run: Any, xcoms: list[tuple[str, Any]], store: ArtifactStore) -> GalleryRun:
    conf = dict(dag_run.conf or {})
    params: dict[str, Any] = {}
    run = GalleryRun(dag_id=dag_run.dag_id, run_id=dag_run.run_id, state=str(dag_run.state),
                     start_date=_iso(dag_run.start_date), end_date=_iso(dag_run.end_date),
                     seconds=(dag_run.end_date - dag_run.start_date).total_seconds()
                     if dag_run.start_date and dag_run.end_date else None,
                     tier=str(conf[TIER_PARAM]) if conf.get(TIER_PARAM) else None, params=params)
    for task_id, value in xcoms:
        manifest = _manifest(value)
        if manifest is None:
            continue
        images = _images(manifest, task_id, run.dag_id, run.run_id, store)
        params.update(manifest.get("params") or {})
        run.images.extend(images)
        run.tasks.append(_task(manifest, task_id, run.dag_id, run.run_id, bool(images)))
    params.update({name: value for name, value in conf.items() if name != TIER_PARAM})
    run.params = dict(sorted(params.items()))
    return run
