"""The gallery plugin's routes, as URLs: built by the extra links (in the worker, when a task finishes) and by
the plugin's own pages. Pure Python (no Airflow, no FastAPI), so the worker and the api-server agree on them.

::

    {PREFIX}/gallery[?dag_id=&run_id=&task_id=]     the gallery page (a DAG run's tab: dag_id and run_id)
    {PREFIX}/api/runs[?dag_id=&run_id=&task_id=]    what the gallery shows, as JSON
    {PREFIX}/runs/<dag_id>/<run_id>/files/<path>    an object the run wrote (path: under runs/<dag>/<run>/)
    {PREFIX}/runs/<dag_id>/<run_id>/thumbs/<path>   a thumbnail of an image the run wrote
    {PREFIX}/upload                                 GET: the upload page; POST: an input image
    {PREFIX}/workflows/<dag_id>                     the workflow JSON a workflow DAG is built from
    {PREFIX}/workflows/<dag_id>/sidecar             its sidecar (YAML), if it has one
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

#: Where the api-server mounts the plugin's app.
PREFIX = "/comfy"


def _segment(text: str) -> str:
    return quote(str(text), safe="")


def _path(path: str) -> str:
    return quote(path, safe="/")


def run_file_url(base: str, dag_id: str, run_id: str, path: str) -> str:
    """The URL of the object at ``path`` (relative to the run's folder ``runs/<dag>/<run>/``)."""
    return f"{base.rstrip('/')}{PREFIX}/runs/{_segment(dag_id)}/{_segment(run_id)}/files/{_path(path)}"


def run_thumb_url(base: str, dag_id: str, run_id: str, path: str) -> str:
    """The URL of a thumbnail of the image at ``path`` (relative to the run's folder)."""
    return f"{base.rstrip('/')}{PREFIX}/runs/{_segment(dag_id)}/{_segment(run_id)}/thumbs/{_path(path)}"


def gallery_url(base: str, dag_id: str | None = None, run_id: str | None = None,
                task_id: str | None = None) -> str:
    """The gallery page, narrowed to a DAG, a run of it, or one task of the run."""
    query = {name: value for name, value in (("dag_id", dag_id), ("run_id", run_id), ("task_id", task_id))
             if value}
    return f"{base.rstrip('/')}{PREFIX}/gallery" + (f"?{urlencode(query)}" if query else "")


def run_page_url(base: str, dag_id: str, run_id: str) -> str:
    """The DAG run's page of the Airflow UI."""
    return f"{base.rstrip('/')}/dags/{_segment(dag_id)}/runs/{_segment(run_id)}"


def workflow_file_url(base: str, dag_id: str, *, sidecar: bool = False) -> str:
    """The workflow file (or its sidecar) that DAG ``dag_id`` is built from."""
    return f"{base.rstrip('/')}{PREFIX}/workflows/{_segment(dag_id)}" + ("/sidecar" if sidecar else "")
