"""The Airflow plugin of this package (``airflow.plugins`` entry point):

* its listener starts the VIP preemption watcher in the scheduler (:mod:`airflow_comfy.scheduling.listener`);
* its FastAPI app, the gallery (:mod:`airflow_comfy.gallery.app`), is mounted by the api-server at ``/comfy``;
* its external views show the gallery inside the UI: a "ComfyUI outputs" entry under Browse, and a tab of
  the same name on every DAG run's page (narrowed to that run);
* importing it registers the format of image params (:mod:`airflow_comfy.factory.param_formats`), so that the
  api-server refuses a bad input image at trigger time with a sentence.

Cheap to import: Airflow loads plugins in every process, and only the api-server serves the app, so FastAPI and
the gallery are imported when the first request reaches it (:class:`LazyGalleryApp`), never here.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_comfy.factory.param_formats import register_param_formats
from airflow_comfy.gallery.urls import PREFIX
from airflow_comfy.scheduling import listener

register_param_formats()


class LazyGalleryApp:
    """An ASGI app that builds the gallery's FastAPI app on its first request and hands every request to it."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._app is None:
            from airflow_comfy.gallery.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return "airflow_comfy.gallery.app"


GALLERY_VIEWS = [
    {"name": "ComfyUI outputs", "href": f"{PREFIX}/gallery", "destination": "nav", "category": "browse",
     "url_route": "comfy-gallery"},
    {"name": "ComfyUI outputs", "href": f"{PREFIX}/gallery?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
     "destination": "dag_run", "url_route": "comfy-run-gallery"},
    {"name": "Upload input image", "href": f"{PREFIX}/upload", "destination": "nav", "category": "browse",
     "url_route": "comfy-upload"},
]


class ComfyPlugin(AirflowPlugin):
    name = "airflow_comfy"
    listeners = [listener]
    fastapi_apps = [{"app": LazyGalleryApp(), "url_prefix": PREFIX, "name": "airflow-comfy gallery"}]
    external_views = GALLERY_VIEWS
