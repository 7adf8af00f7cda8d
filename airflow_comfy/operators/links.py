"""The extra links of every group task ("Output images", "Run snapshot"): one click from the task to what it made.

Airflow 3 shows a task's extra links from XCom: when the task finishes, the worker calls each link's
``get_link`` and stores the URL under the link's ``xcom_key``; the api-server only reads it back (the
serialized DAG keeps ``{name: xcom_key}``). So the URL is made here, in the worker, from the manifest the task
has just returned (kept on the operator by ``execute``), and a task that wrote no image gets no link (an empty
URL, which the UI does not show). Nothing needs registering in the plugin: Airflow 3.3 looks links up by
name and XCom key; the provider info lists the classes (``airflow providers links``).

Where they point:

* ``file://`` store: the gallery plugin's routes (:mod:`airflow_comfy.gallery.urls`), which check the user's
  token and DAG permission; one image: the image itself, several: the gallery page of this task.
* ``s3://`` store: one image: a presigned URL of it (valid :data:`LINK_EXPIRY_SECONDS`, signed with the task's
  store credentials, host = ``[comfy] link_endpoint_url``, else the store's endpoint); several: the gallery
  page. The snapshot likewise.

The URLs start with ``[api] base_url`` (empty: relative to the UI's own origin).
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseOperatorLink

from airflow_comfy.artifacts import layout
from airflow_comfy.gallery.paths import run_relative_path
from airflow_comfy.gallery.urls import gallery_url, run_file_url

log = logging.getLogger(__name__)

#: How long a presigned S3 link lasts: seven days, the most SigV4 allows.
LINK_EXPIRY_SECONDS = 7 * 24 * 3600
#: The attribute ``execute`` keeps the returned manifest in, for the links (same object in ``finalize``).
MANIFEST_ATTRIBUTE = "comfy_manifest"


def api_base_url() -> str:
    """``[api] base_url`` ("" when unset: links relative to the UI's origin)."""
    try:
        from airflow.configuration import conf

        return (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    except Exception:  # no configuration to read: relative links still work in the UI
        return ""


def _images(manifest: Any) -> list[dict[str, Any]]:
    if not isinstance(manifest, dict):
        return []
    return [image for image in manifest.get("images") or [] if isinstance(image, dict) and image.get("uri")]


def _presigner(operator: Any) -> Any:
    """The task's S3 store (with its connection's credentials), to sign links with; at ``[comfy]
    link_endpoint_url`` when that is set (signing is local: that address need not be reachable from here)."""
    from airflow_comfy.artifacts.store import open_store
    from airflow_comfy.config import raw_setting
    from airflow_comfy.operators.local import aws_env_from_connection
    from airflow_comfy.operators.spec_publish import s3_options

    conn_id = getattr(operator, "aws_conn_id", None)
    options = s3_options(aws_env_from_connection(conn_id) if conn_id else None)
    public = raw_setting("link_endpoint_url").strip()
    if public:
        options["endpoint_url"] = public
    return open_store(operator.store, **options)


def _object_link(operator: Any, dag_id: str, run_id: str, key: str, base: str) -> str:
    """The URL of one object of the run: presigned on S3, the plugin's file route otherwise."""
    store_uri = str(getattr(operator, "store", "") or "")
    if store_uri.startswith("s3://"):
        return _presigner(operator).presigned_url(key, expires_in=LINK_EXPIRY_SECONDS)
    relative = run_relative_path(dag_id, run_id, key)
    if relative is None:
        raise ValueError(f"{key} is not in the folder of run {run_id} of {dag_id}")
    return run_file_url(base, dag_id, run_id, relative)


def _key_of(operator: Any, uri: str) -> str:
    from airflow_comfy.artifacts.store import open_store

    store_uri = str(getattr(operator, "store", "") or "")
    if store_uri.startswith("s3://"):
        return _presigner(operator).key_of(uri)
    return open_store(store_uri).key_of(uri)


def output_images_url(operator: Any, dag_id: str, run_id: str, task_id: str, base: str) -> str:
    """The "Output images" URL of a finished group task ("" if it wrote none)."""
    images = _images(getattr(operator, MANIFEST_ATTRIBUTE, None))
    if not images:
        return ""
    if len(images) > 1:
        return gallery_url(base, dag_id, run_id, task_id)
    return _object_link(operator, dag_id, run_id, _key_of(operator, images[0]["uri"]), base)


def run_snapshot_url(operator: Any, dag_id: str, run_id: str, base: str) -> str:
    """The "Run snapshot" URL: the snapshot the group published beside its images ("" if it wrote none)."""
    manifest = getattr(operator, MANIFEST_ATTRIBUTE, None)
    if not _images(manifest):
        return ""
    key = layout.snapshot_key(manifest["run_key"], manifest["group"])
    return _object_link(operator, dag_id, run_id, key, base)


class OutputImagesLink(BaseOperatorLink):
    """The images the task wrote: one image, or the gallery page of the task when there are several."""

    name = "Output images"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return output_images_url(operator, ti_key.dag_id, ti_key.run_id, ti_key.task_id, api_base_url())


class RunSnapshotLink(BaseOperatorLink):
    """The run snapshot (workflow, params, package version) the task published beside its images."""

    name = "Run snapshot"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return run_snapshot_url(operator, ti_key.dag_id, ti_key.run_id, api_base_url())


GROUP_TASK_LINKS = (OutputImagesLink(), RunSnapshotLink())
