"""The gallery plugin's FastAPI app, mounted by the api-server at :data:`~airflow_comfy.gallery.urls.PREFIX`
(``ComfyPlugin.fastapi_apps``). Routes: :mod:`airflow_comfy.gallery.urls`. Every route first resolves the
caller (401 without a valid Airflow token) and checks their permission on the DAG concerned (403)
(:mod:`airflow_comfy.gallery.auth`); paths in requests are confined to the run's folder of the artifact store,
or to the input folder for uploads (:mod:`airflow_comfy.gallery.paths`: 400 for a path that tries to leave,
404 for a symbolic link that does). Uploads go to the input store, else the input folder
(:mod:`airflow_comfy.gallery.uploads`). A workflow DAG's workflow file (and sidecar) is found from the DAG,
confined to the workflows folder (:mod:`airflow_comfy.gallery.workflow_files`).

The api-server needs the ``[comfy]`` settings the workers have (``artifact_store``, ``aws_conn_id``,
``input_store``, ``input_path``), the store credentials, the input folder mounted where ``input_path`` says
(writable) when there is no input store, and, for an ``s3://`` store, boto3.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile, status
from fastapi.responses import HTMLResponse, JSONResponse, Response

from airflow_comfy.artifacts.errors import ArtifactError, ArtifactNotFound
from airflow_comfy.artifacts.layout import run_prefix
from airflow_comfy.artifacts.store import ArtifactStore, LocalStore, guess_content_type
from airflow_comfy.gallery import auth, pages
from airflow_comfy.gallery.paths import BadPath, OutsideStore, confined_file, run_object_key
from airflow_comfy.gallery.runs import recent_runs
from airflow_comfy.gallery.uploads import save_upload
from airflow_comfy.gallery.urls import PREFIX
from airflow_comfy.gallery.workflow_files import NoWorkflowFile, read_workflow_file, workflow_dag

#: The largest input image an upload may carry.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Thumbnails are at most this many pixels wide and high.
THUMBNAIL_PX = 256
#: Objects served with their own content type; anything else is a download (never rendered as a page).
_INLINE_TYPES = {"image/png", "image/jpeg", "image/webp", "application/json"}

User = Annotated[Any, Depends(auth.current_user)]


@functools.cache
def artifact_store() -> ArtifactStore:
    """The ``[comfy] artifact_store`` as the api-server reads it (S3: with ``aws_conn_id``'s credentials)."""
    from airflow_comfy.config import get_settings

    return _open_settings_store(get_settings().artifact_store)


@functools.cache
def input_store() -> ArtifactStore | None:
    """The ``[comfy] input_store`` that uploads go to (None: uploads go to the input folder), opened like the
    artifact store: the same credentials the tasks hand the runner to read inputs, the same bounds."""
    from airflow_comfy.config import get_settings

    uri = get_settings().input_store
    return _open_settings_store(uri) if uri else None


def _open_settings_store(uri: str) -> ArtifactStore:
    """A store named in ``[comfy]``, opened as the workers open it: S3 with ``aws_conn_id``'s credentials when
    that is set (else boto3's default chain), every operation bounded by the ``store_*`` settings."""
    from airflow_comfy.artifacts.store import open_store
    from airflow_comfy.config import get_settings
    from airflow_comfy.operators.spec_publish import s3_options

    settings = get_settings()
    options: dict[str, Any] = {}
    if uri.startswith("s3://") and settings.aws_conn_id:
        options = s3_options(_connection_env(settings.aws_conn_id))
    return open_store(uri, limits=settings.store_limits, **options)


def _connection_env(conn_id: str) -> dict[str, str]:
    """The ``AWS_*`` variables of Airflow connection ``conn_id``, read as the api-server reads connections."""
    from airflow.models.connection import Connection

    from airflow_comfy.operators.local import AWS_EXTRA_ENV

    conn = Connection.get_connection_from_secrets(conn_id)
    env = {"AWS_ACCESS_KEY_ID": conn.login or "", "AWS_SECRET_ACCESS_KEY": conn.password or ""}
    extra = conn.extra_dejson or {}
    env.update({name: str(extra[key]) for key, name in AWS_EXTRA_ENV.items() if extra.get(key)})
    return {name: value for name, value in env.items() if value}


def input_root() -> Path:
    from airflow_comfy.config import get_settings

    return Path(get_settings().input_path)


def ui_base(request: Request) -> str:
    """The UI's root path as the browser sees it ("" when Airflow is served at the host's root)."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return root[: -len(PREFIX)] if root.endswith(PREFIX) else root


def read_run_object(dag_id: str, run_id: str, path: str) -> tuple[str, bytes]:
    """(key, bytes) of ``path`` in the run's folder; :class:`BadPath`, :class:`OutsideStore` or
    :class:`ArtifactNotFound` when it is not a plain path, leaves the folder, or is not there."""
    key = run_object_key(dag_id, run_id, path)
    store = artifact_store()
    if isinstance(store, LocalStore):
        real = confined_file(store.root, key, run_prefix(f"{dag_id}/{run_id}"))
        try:
            return key, real.read_bytes()
        except OSError:
            raise ArtifactNotFound(f"no artifact at {store.uri(key)}") from None
    return key, store.get_bytes(key)


def _object_response(key: str, data: bytes) -> Response:
    content_type = guess_content_type(key)
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
               "Cache-Control": "private, max-age=300"}
    if content_type not in _INLINE_TYPES:
        content_type = "application/octet-stream"
        headers["Content-Disposition"] = f"attachment; filename=\"{key.rsplit('/', 1)[-1]}\""
    return Response(content=data, media_type=content_type, headers=headers)


def thumbnail(data: bytes, size: int) -> tuple[bytes, str] | None:
    """A PNG at most ``size`` pixels on a side; None when Pillow is not installed or cannot read the image (it is
    then sent as it is)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    out = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((size, size))
            image.save(out, format="PNG")
    except (OSError, ValueError, Image.DecompressionBombError):  # not an image Pillow can shrink: send it as is
        return None
    return out.getvalue(), "image/png"


def _fetch(dag_id: str, run_id: str, path: str) -> tuple[str, bytes]:
    """:func:`read_run_object` with its failures as HTTP answers (the message never holds file contents)."""
    try:
        return read_run_object(dag_id, run_id, path)
    except BadPath as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except (OutsideStore, ArtifactNotFound):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no object {path!r} in run {run_id!r} of {dag_id!r}") \
            from None
    except ArtifactError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"the artifact store did not answer: {exc}") from None


def _workflow_file_response(dag_id: str, *, sidecar: bool) -> Response:
    """The DAG's workflow JSON (or YAML sidecar), shown in the browser; 404 with the reason when there is none."""
    try:
        name, data = read_workflow_file(workflow_dag(dag_id), sidecar=sidecar)
    except NoWorkflowFile as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    media_type = "text/plain; charset=utf-8" if sidecar else "application/json"
    quoted = re.sub(r"[^A-Za-z0-9._-]", "_", name)  # a header's value: ASCII, no quotes
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
               "Cache-Control": "private, no-cache", "Content-Disposition": f'inline; filename="{quoted}"'}
    return Response(content=data, media_type=media_type, headers=headers)


def create_app() -> FastAPI:
    app = FastAPI(title="airflow-comfy gallery", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/gallery", response_class=HTMLResponse)
    def gallery(request: Request, user: User, dag_id: str | None = None, run_id: str | None = None,
                task_id: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 24) -> HTMLResponse:
        if dag_id:
            auth.require(user, dag_id, "GET")
        runs = recent_runs(auth.readable_dag_ids(user), artifact_store(), dag_id=dag_id, run_id=run_id,
                           task_id=task_id, limit=limit)
        title = f"ComfyUI outputs of {dag_id}" + (f" · {run_id}" if run_id else "") if dag_id else "ComfyUI outputs"
        return HTMLResponse(pages.gallery_page(runs, ui_base(request), title))

    @app.get("/api/runs")
    def runs_json(user: User, dag_id: str | None = None, run_id: str | None = None, task_id: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=100)] = 24) -> JSONResponse:
        if dag_id:
            auth.require(user, dag_id, "GET")
        runs = recent_runs(auth.readable_dag_ids(user), artifact_store(), dag_id=dag_id, run_id=run_id,
                           task_id=task_id, limit=limit)
        return JSONResponse({"runs": [run.to_dict() for run in runs]})

    @app.get("/runs/{dag_id}/{run_id}/files/{path:path}")
    def run_file(user: User, dag_id: str, run_id: str, path: str) -> Response:
        auth.require(user, dag_id, "GET")
        return _object_response(*_fetch(dag_id, run_id, path))

    @app.get("/runs/{dag_id}/{run_id}/thumbs/{path:path}")
    def run_thumb(user: User, dag_id: str, run_id: str, path: str,
                  size: Annotated[int, Query(ge=16, le=1024)] = THUMBNAIL_PX) -> Response:
        auth.require(user, dag_id, "GET")
        key, data = _fetch(dag_id, run_id, path)
        if guess_content_type(key) not in ("image/png", "image/jpeg", "image/webp"):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{path!r} is not an image")
        small = thumbnail(data, size)
        if small is None:
            return _object_response(key, data)
        return Response(content=small[0], media_type=small[1],
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=300"})

    @app.get("/workflows/{dag_id}")
    def workflow_file(user: User, dag_id: str) -> Response:
        auth.require_dag_read(user, dag_id)
        return _workflow_file_response(dag_id, sidecar=False)

    @app.get("/workflows/{dag_id}/sidecar")
    def workflow_sidecar(user: User, dag_id: str) -> Response:
        auth.require_dag_read(user, dag_id)
        return _workflow_file_response(dag_id, sidecar=True)

    @app.get("/upload", response_class=HTMLResponse)
    def upload_form(request: Request, user: User, dag_id: str | None = None) -> HTMLResponse:
        triggerable = [dag for dag in sorted(auth.readable_dag_ids(user)) if auth.may(user, dag, "POST")]
        store = input_store()
        return HTMLResponse(pages.upload_page(triggerable, ui_base(request), dag_id,
                                              store_uri=store.root_uri if store is not None else ""))

    @app.post("/upload")
    async def upload(user: User, dag_id: Annotated[str, Form()], file: Annotated[UploadFile, File()]) -> JSONResponse:
        auth.require(user, dag_id, "POST")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                                f"the image is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
        try:
            saved = save_upload(file.filename or "", data, store=input_store(), input_root=input_root())
        except BadPath as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
        except ArtifactError as exc:
            where = "the input store" if input_store() is not None else "the input folder"
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"cannot write {where}: {exc}") from None
        return JSONResponse({"name": saved.name, "uri": saved.uri, "value": saved.value, "where": saved.where,
                             "param": "image", "dag_id": dag_id}, status_code=status.HTTP_201_CREATED)

    return app
