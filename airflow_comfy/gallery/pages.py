"""The gallery plugin's HTML pages: plain server-rendered HTML (no build step, nothing fetched from elsewhere),
shown inside the Airflow UI's iframe. Element ids and classes are stable (browser tests and users' styles rely on
them; listed in the README, "Outputs in the UI"). Everything from a run is escaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from html import escape

from airflow_comfy.gallery.runs import GalleryRun
from airflow_comfy.gallery.urls import PREFIX, gallery_url, run_file_url, run_page_url, run_thumb_url

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1rem; color: #1a202c; }
nav a { margin-right: 1rem; }
.comfy-run { border-top: 1px solid #cbd5e0; padding: .75rem 0; }
.comfy-run h2 { font-size: 1rem; margin: 0 0 .25rem; }
.comfy-run dl { display: grid; grid-template-columns: max-content auto; gap: .1rem .75rem; margin: .25rem 0; }
.comfy-run dt { font-weight: 600; }
.comfy-images { display: flex; flex-wrap: wrap; gap: .5rem; }
.comfy-thumb { width: 192px; height: 192px; object-fit: contain; border: 1px solid #cbd5e0; border-radius: 4px;
               background: #f7fafc; image-rendering: pixelated; }
.comfy-error { color: #c53030; }
"""


def _page(title: str, body: str, base: str) -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>"
            f"<nav id=\"comfy-nav\"><a id=\"comfy-nav-gallery\" href=\"{escape(gallery_url(base))}\">Gallery</a>"
            f"<a id=\"comfy-nav-upload\" href=\"{escape(base)}{PREFIX}/upload\">Upload an input image</a></nav>"
            f"<h1>{escape(title)}</h1>{body}</body></html>")


def _timings(run: GalleryRun) -> str:
    parts = [f"{escape(task.task_id)} {task.seconds:.1f} s" for task in run.tasks if task.seconds is not None]
    if run.seconds is not None:
        parts.append(f"run {run.seconds:.1f} s")
    return ", ".join(parts) or "–"


def _run_section(run: GalleryRun, base: str) -> str:
    images = "".join(
        f"<a class=\"comfy-image\" target=\"_blank\" data-task-id=\"{escape(image.task_id)}\" "
        f"href=\"{escape(run_file_url(base, run.dag_id, run.run_id, image.path))}\">"
        f"<img class=\"comfy-thumb\" loading=\"lazy\" alt=\"{escape(image.filename)}\" "
        f"src=\"{escape(run_thumb_url(base, run.dag_id, run.run_id, image.path))}\"></a>"
        for image in run.images)
    snapshots = " ".join(
        f"<a class=\"comfy-snapshot\" target=\"_blank\" "
        f"href=\"{escape(run_file_url(base, run.dag_id, run.run_id, task.snapshot))}\">{escape(task.task_id)}</a>"
        for task in run.tasks if task.snapshot)
    params = escape(json.dumps(run.params, sort_keys=True, default=str))
    return (
        f"<section class=\"comfy-run\" data-dag-id=\"{escape(run.dag_id)}\" data-run-id=\"{escape(run.run_id)}\">"
        f"<h2><a class=\"comfy-run-link\" target=\"_top\" "
        f"href=\"{escape(run_page_url(base, run.dag_id, run.run_id))}\">{escape(run.dag_id)} · "
        f"{escape(run.run_id)}</a></h2><dl>"
        f"<dt>Workflow</dt><dd class=\"comfy-run-dag\">{escape(run.dag_id)}</dd>"
        f"<dt>State</dt><dd class=\"comfy-run-state\">{escape(run.state)}</dd>"
        f"<dt>Tier</dt><dd class=\"comfy-run-tier\">{escape(run.tier or 'default')}</dd>"
        f"<dt>Params</dt><dd><code class=\"comfy-run-params\">{params}</code></dd>"
        f"<dt>Timings</dt><dd class=\"comfy-run-timings\">{_timings(run)}</dd>"
        f"<dt>Snapshot</dt><dd class=\"comfy-run-snapshots\">{snapshots or '–'}</dd>"
        f"</dl><div class=\"comfy-images\">{images}</div></section>")


def gallery_page(runs: Iterable[GalleryRun], base: str, title: str = "ComfyUI outputs") -> str:
    """The gallery: one section per run, newest first. ``base``: the UI's root path ("" at the server's root)."""
    sections = "".join(_run_section(run, base) for run in runs)
    body = (f"<main id=\"comfy-gallery\">{sections}</main>" if sections else
            "<main id=\"comfy-gallery\"><p id=\"comfy-gallery-empty\">No images yet: trigger a workflow DAG and "
            "its images show up here.</p></main>")
    return _page(title, body, base)


_UPLOAD_SCRIPT = """
document.getElementById("comfy-upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = document.getElementById("comfy-upload-result");
  result.textContent = "Uploading…";
  const response = await fetch(event.target.action, {method: "POST", body: new FormData(event.target),
                                                      credentials: "same-origin"});
  const answer = await response.json().catch(() => ({detail: response.statusText}));
  if (response.ok) {
    result.innerHTML = 'Use <code id="comfy-upload-name"></code> as the <b>image</b> param of the trigger form.';
    document.getElementById("comfy-upload-name").textContent = answer.value;
    result.className = "comfy-ok";
  } else {
    result.textContent = "Refused: " + (answer.detail || response.status);
    result.className = "comfy-error";
  }
});
"""


def upload_target(store_uri: str) -> str:
    """The sentence that says where an upload goes and what the page then gives to paste into the form."""
    if store_uri:
        return (f"Images are written into the input store {store_uri.rstrip('/')}/; the page then shows the "
                "image's s3:// URI to give as the image param of the trigger form.")
    return ("Images are written into the input folder ([comfy] input_path); the page then shows the image's "
            "file name to give as the image param of the trigger form.")


def upload_page(dag_ids: Iterable[str], base: str, selected: str | None = None, *, store_uri: str = "") -> str:
    """A form that uploads an input image for one of ``dag_ids`` (those the user may trigger) into the input
    store ``store_uri`` (empty: into the input folder), saying which."""
    options = "".join(f"<option value=\"{escape(dag_id)}\"{' selected' if dag_id == selected else ''}>"
                      f"{escape(dag_id)}</option>" for dag_id in sorted(dag_ids))
    if not options:
        return _page("Upload an input image", "<p id=\"comfy-upload-none\" class=\"comfy-error\">You may not "
                     "trigger any DAG, so you cannot upload input images.</p>", base)
    where = "input_store" if store_uri else "input_path"
    body = (f"<p id=\"comfy-upload-target\" data-where=\"{where}\">{escape(upload_target(store_uri))}</p>"
            f"<form id=\"comfy-upload-form\" method=\"post\" enctype=\"multipart/form-data\" "
            f"action=\"{escape(base)}{PREFIX}/upload\">"
            f"<p><label>For the DAG <select id=\"comfy-upload-dag\" name=\"dag_id\">{options}</select></label></p>"
            "<p><label>Image (PNG, JPEG or WebP) <input id=\"comfy-upload-file\" type=\"file\" name=\"file\" "
            "accept=\"image/png,image/jpeg,image/webp\" required></label></p>"
            "<p><button id=\"comfy-upload-submit\" type=\"submit\">Upload</button></p></form>"
            "<p><output id=\"comfy-upload-result\"></output></p>"
            f"<script>{_UPLOAD_SCRIPT}</script>")
    return _page("Upload an input image", body, base)
