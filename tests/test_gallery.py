"""Outputs in the UI, through a real api-server: the gallery plugin (loaded through the package's
``airflow.plugins`` entry point, mounted at ``/comfy``) and the group tasks' extra links, with Airflow's simple
auth manager (``tests/per_dag_auth_manager.py``: the simple one with per-DAG access, as a real deployment's) and
three real users (``admin``; ``viewer``: may see runs but not trigger them; ``outsider``: an admin refused the DAG
``gallery_img2img``), tokens from ``POST /auth/token``. The scheduler (LocalExecutor) and dag-processor run ``img2img`` (four groups) on the tiny
demo models with a file:// artifact store; the presigned S3 link is checked against moto's S3 server.

* anonymous (and forged-token) requests to every route: 401; a viewer uploading: 403;
* a user refused one DAG: 403 from every route for that DAG (image, thumbnail, snapshot, workflow file and
  sidecar, the gallery narrowed to it or its run, upload), 200 for another DAG, whose runs alone the gallery lists;
* the "Output images" extra link of a finished run opens that run's image (same bytes as the store's file),
  "Run snapshot" its snapshot; a task that wrote no image has no link;
* the gallery lists the run (workflow, params, tier, timings, thumbnails that are PNGs);
* paths that try to leave the run's folder (``..``, ``%2e%2e``, absolute, a symbolic link to a file outside):
  400 or 404, never the file's bytes;
* an admin's upload lands in the input folder and its name, given as the ``image`` param, runs the next run;
* the DAG docs' links (read through the REST API) serve the workflow file and its sidecar, byte for byte; a
  DAG that is not a workflow DAG (even one whose docs name a workflow file), an unknown DAG and a workflow
  whose file is a symbolic link out of the workflows folder: 404, never the file.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from airflow_deployment import AirflowDeployment
from PIL import Image
from postgres import migrated_airflow_database
from workflow_builders import EXAMPLES, REPO

pytestmark = pytest.mark.airflow

DAG_ID = "gallery_img2img"
#: As the UI names runs: ``:`` and ``+`` travel percent-encoded in the plugin's URLs.
FIRST_RUN = "manual__2026-11-27T10:00:00+00:00"
RUN_SEGMENT = quote(FIRST_RUN, safe="")
PASSWORDS = {"admin": "admin-secret", "viewer": "viewer-secret", "outsider": "outsider-secret"}
#: A second workflow DAG (img2img again) with a run: the one the outsider may see.
OTHER_DAG = "gallery_other"
OTHER_RUN = "manual__2026-11-27T11:00:00+00:00"
#: An admin everywhere but on :data:`DAG_ID`, which the test auth manager (``tests/per_dag_auth_manager.py``)
#: takes from them, as a real deployment's auth manager takes a DAG from a user.
OUTSIDER = "outsider"
SECRET_BYTES = b"\x89PNG\r\n\x1a\n not for your eyes: outside the store"
#: A workflow DAG whose file is a symbolic link to a workflow outside the workflows folder.
ESCAPING_DAG = "gallery_escaping"
#: A Python DAG of the same folder whose docs imitate a workflow DAG's, naming the gallery's workflow file.
PLAIN_DAG = "gallery_plain"
PLAIN_DAG_FILE = """from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("gallery_plain", schedule=None, doc_md="Source: `{source}` (API format)"):
    EmptyOperator(task_id="nothing")
"""


class Gallery:
    """The deployment, its folders and a tiny HTTP client that sends paths exactly as given (no normalizing)."""

    def __init__(self, deployment: AirflowDeployment, home: Path) -> None:
        self.deployment, self.home = deployment, home
        self.store = home / "artifacts"
        self.inputs = home / "input"
        self.tokens: dict[str, str] = {}

    def request(self, method: str, path: str, *, user: str | None = None, token: str | None = None,
                body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
        headers = dict(headers or {})
        if user:
            token = self.token(user)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.deployment.api_port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            conn.close()

    def token(self, user: str) -> str:
        if user not in self.tokens:
            status, body, _ = self.request("POST", "/auth/token", body=json.dumps(
                {"username": user, "password": PASSWORDS[user]}).encode(), headers={"Content-Type": "application/json"})
            assert status == 201, body
            self.tokens[user] = json.loads(body)["access_token"]
        return self.tokens[user]

    def json(self, path: str, user: str = "admin") -> object:
        status, body, _ = self.request("GET", path, user=user)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def upload(self, filename: str, data: bytes, *, user: str | None = "admin",
               dag_id: str = DAG_ID) -> tuple[int, bytes]:
        boundary = "comfy-test-boundary"
        parts = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"dag_id\"\r\n\r\n{dag_id}\r\n"
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, body, _ = self.request("POST", "/comfy/upload", user=user, body=parts,
                                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, body

    def trigger_and_wait(self, run_id: str, conf: dict | None = None, timeout: float = 600,
                         dag_id: str = DAG_ID) -> str:
        self.trigger(run_id, conf, dag_id=dag_id)
        return self.wait_for_run(run_id, timeout, dag_id=dag_id)

    def trigger(self, run_id: str, conf: dict | None = None, *, dag_id: str = DAG_ID) -> None:
        self.deployment.airflow("dags", "trigger", dag_id, "-r", run_id, "-c", json.dumps(conf or {}))

    def wait_for_run(self, run_id: str, timeout: float = 600, *, dag_id: str = DAG_ID) -> str:
        def finished() -> str | None:
            rows = self.deployment.sql(f"SELECT state FROM dag_run WHERE dag_id = '{dag_id}' AND run_id = '{run_id}'")
            return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

        return self.deployment.wait_for(f"run {run_id} of {dag_id}", finished, timeout, interval=2.0)

    def run_entry(self, run_id: str, dag_id: str = DAG_ID) -> dict:
        runs = self.json(f"/comfy/api/runs?dag_id={dag_id}&run_id={quote(run_id, safe='')}")["runs"]
        assert len(runs) == 1, runs
        return runs[0]


@pytest.fixture(scope="module")
def gallery(postgres_server, demo_models: Path, demo_inputs: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gallery]:
    home = tmp_path_factory.mktemp("gallery-airflow")
    dags = home / "dags"
    dags.mkdir()
    for stub in ("comfy_workflows.py", "comfy_workflow_errors.py"):
        shutil.copy(REPO / "dags" / stub, dags)
    shutil.copy(EXAMPLES / "img2img.json", dags / f"{DAG_ID}.json")
    (dags / f"{DAG_ID}.comfy.yaml").write_text("description: img2img, for the gallery tests\n")
    shutil.copy(EXAMPLES / "img2img.json", dags / f"{OTHER_DAG}.json")
    (dags / f"{OTHER_DAG}.comfy.yaml").write_text("description: img2img again, the outsider's DAG\n")
    auth_path = home / "auth-manager"  # only the test auth manager, not the rest of tests/, on PYTHONPATH
    auth_path.mkdir()
    shutil.copy(Path(__file__).with_name("per_dag_auth_manager.py"), auth_path)
    outside = home / "outside"
    outside.mkdir()
    shutil.copy(EXAMPLES / "img2img.json", outside / f"{ESCAPING_DAG}.json")
    (dags / f"{ESCAPING_DAG}.json").symlink_to(outside / f"{ESCAPING_DAG}.json")
    (dags / "plain_dag.py").write_text(PLAIN_DAG_FILE.format(source=dags / f"{DAG_ID}.json"))
    shutil.copytree(demo_inputs, home / "input")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    (home / "secret.png").write_bytes(SECRET_BYTES)
    database = migrated_airflow_database(postgres_server, "gallery", {**os.environ, "AIRFLOW_HOME": str(home)},
                                         airflow_bin=str(Path(sys.executable).with_name("airflow")))
    deployment = AirflowDeployment(home, database, dags, env={
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), str(auth_path), os.environ.get("PYTHONPATH", ""))
                                      if p),
        "AIRFLOW__CORE__AUTH_MANAGER": "per_dag_auth_manager.PerDagAuthManager",
        "AIRFLOW__PER_DAG_AUTH_MANAGER__DENIED": f"{OUTSIDER}:{DAG_ID}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"admin:admin,viewer:viewer,{OUTSIDER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__COMFY__ARTIFACT_STORE": f"file://{home}/artifacts",
        "AIRFLOW__COMFY__MODELS_PATH": str(demo_models),
        "AIRFLOW__COMFY__INPUT_PATH": str(home / "input"),
        "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
        "AIRFLOW__COMFY__RUNNER_PYTHON": sys.executable,
        "AIRFLOW__COMFY__RUNNER_SERVICE_DIR": os.environ["AIRFLOW__COMFY__RUNNER_SERVICE_DIR"],  # conftest's
        "COMFY_RUNNER_THREADS": "1",
    })
    deployment.env["AIRFLOW__API__BASE_URL"] = f"http://127.0.0.1:{deployment.api_port}"
    with deployment:
        deployment.wait_for_api()
        deployment.wait_for_dags({DAG_ID, OTHER_DAG, ESCAPING_DAG, PLAIN_DAG})
        result = Gallery(deployment, home)
        result.trigger(FIRST_RUN)
        result.trigger(OTHER_RUN, dag_id=OTHER_DAG)
        assert result.wait_for_run(FIRST_RUN) == "success", deployment.logs_tail()
        assert result.wait_for_run(OTHER_RUN, dag_id=OTHER_DAG) == "success", deployment.logs_tail()
        yield result


ROUTES = ["/comfy/gallery", f"/comfy/gallery?dag_id={DAG_ID}", "/comfy/api/runs", "/comfy/upload",
          f"/comfy/runs/{DAG_ID}/{RUN_SEGMENT}/files/outputs/x.png",
          f"/comfy/runs/{DAG_ID}/{RUN_SEGMENT}/thumbs/outputs/x.png",
          f"/comfy/workflows/{DAG_ID}", f"/comfy/workflows/{DAG_ID}/sidecar"]


def test_anonymous_and_forged_requests_get_401(gallery: Gallery):
    for path in ROUTES:
        assert gallery.request("GET", path)[0] == 401, path
        assert gallery.request("GET", path, token="not.a.jwt")[0] == 401, path
        assert gallery.request("GET", path, headers={"Cookie": "_token=not.a.jwt"})[0] == 401, path
    status, _ = gallery.upload("x.png", b"\x89PNG\r\n\x1a\nxx", user=None)
    assert status == 401


def test_viewer_sees_the_gallery_but_may_not_upload(gallery: Gallery):
    status, page, _ = gallery.request("GET", "/comfy/gallery", user="viewer")
    assert status == 200 and f'data-run-id="{FIRST_RUN}"'.encode() in page
    # the UI's session cookie, as the browser sends it to the gallery in the UI's iframe
    status, page, _ = gallery.request("GET", f"/comfy/gallery?dag_id={DAG_ID}",
                                      headers={"Cookie": f"_token={gallery.token('viewer')}"})
    assert status == 200 and f'data-run-id="{FIRST_RUN}"'.encode() in page
    status, body = gallery.upload("mine.png", _png((200, 10, 10)), user="viewer")
    assert status == 403, body
    assert not list(gallery.inputs.glob("upload-*"))
    status, page, _ = gallery.request("GET", "/comfy/upload", user="viewer")
    assert status == 200 and b'id="comfy-upload-none"' in page


def _dag_routes(gallery: Gallery, dag_id: str, run_id: str) -> dict[str, str]:
    """Every plugin route that concerns DAG ``dag_id`` (its run ``run_id``): what each serves, by URL path."""
    run = gallery.run_entry(run_id, dag_id)
    image = run["images"][0]
    links = gallery.json(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                         f"{image['task_id']}/links", user="admin")["extra_links"]
    segment = quote(run_id, safe="")
    return {"image": f"/comfy/runs/{dag_id}/{segment}/files/{image['path']}",
            "thumbnail": f"/comfy/runs/{dag_id}/{segment}/thumbs/{image['path']}",
            "snapshot": urlsplit(links["Run snapshot"]).path,
            "workflow file": f"/comfy/workflows/{dag_id}",
            "sidecar": f"/comfy/workflows/{dag_id}/sidecar",
            "DAG's gallery": f"/comfy/gallery?dag_id={dag_id}",
            "run's gallery": f"/comfy/gallery?dag_id={dag_id}&run_id={segment}",
            "run's gallery, as JSON": f"/comfy/api/runs?dag_id={dag_id}&run_id={segment}"}


def test_a_user_without_access_to_a_dag_gets_403_for_it_but_sees_another(gallery: Gallery):
    """The outsider is an admin whom the auth manager refuses :data:`DAG_ID` only: Airflow's own API and every
    route of the plugin refuse that DAG (403, never its bytes) and serve the other one."""
    hidden, visible = _dag_routes(gallery, DAG_ID, FIRST_RUN), _dag_routes(gallery, OTHER_DAG, OTHER_RUN)
    assert gallery.request("GET", f"/api/v2/dags/{DAG_ID}", user=OUTSIDER)[0] == 403  # the auth manager works
    assert gallery.request("GET", f"/api/v2/dags/{OTHER_DAG}", user=OUTSIDER)[0] == 200
    for what, path in hidden.items():
        status, body, _ = gallery.request("GET", path, user=OUTSIDER)
        assert status == 403, (what, path, status, body[:300])
        assert b"\x89PNG" not in body and b"class_type" not in body and FIRST_RUN.encode() not in body, what
        assert gallery.request("GET", path, user="admin")[0] == 200, (what, path)  # refused to them alone
    for what, path in visible.items():
        status, body, _ = gallery.request("GET", path, user=OUTSIDER)
        assert status == 200, (what, path, status, body[:300])
    for page in ("/comfy/gallery", "/comfy/gallery?limit=100"):
        status, body, _ = gallery.request("GET", page, user=OUTSIDER)
        assert status == 200 and f'data-run-id="{OTHER_RUN}"'.encode() in body
        assert f'data-dag-id="{DAG_ID}"'.encode() not in body and FIRST_RUN.encode() not in body
    assert {run["dag_id"] for run in gallery.json("/comfy/api/runs", user=OUTSIDER)["runs"]} == {OTHER_DAG}
    before = set(gallery.inputs.iterdir())
    status, body = gallery.upload("theirs.png", _png((10, 10, 200)), user=OUTSIDER)
    assert status == 403, body
    assert set(gallery.inputs.iterdir()) == before
    status, page, _ = gallery.request("GET", "/comfy/upload", user=OUTSIDER)
    assert status == 200 and f'<option value="{OTHER_DAG}"'.encode() in page
    assert f'<option value="{DAG_ID}"'.encode() not in page
    status, body = gallery.upload("theirs.png", _png((10, 10, 200)), user=OUTSIDER, dag_id=OTHER_DAG)
    assert status == 201, body


def test_dag_docs_link_to_the_workflow_file_and_its_sidecar(gallery: Gallery):
    doc = gallery.json(f"/api/v2/dags/{DAG_ID}/details", user="viewer")["doc_md"]
    links = dict(re.findall(r"\[([^\]]+)\]\((/comfy/workflows/[^)]+)\)", doc))
    assert links == {f"{DAG_ID}.json": f"/comfy/workflows/{DAG_ID}",
                     f"{DAG_ID}.comfy.yaml": f"/comfy/workflows/{DAG_ID}/sidecar"}, doc
    assert f"(`{DAG_ID}.json`) and its sidecar" in doc  # the plain name stays, for copying
    dags = gallery.home / "dags"
    for name, path in links.items():
        status, data, headers = gallery.request("GET", path, user="viewer")
        assert status == 200, (path, data[:300])
        assert data == (dags / name).read_bytes()
        assert headers["content-disposition"].startswith("inline")
        expected = "application/json" if name.endswith(".json") else "text/plain"
        assert headers["content-type"].startswith(expected), headers
    assert json.loads(gallery.request("GET", links[f"{DAG_ID}.json"], user="admin")[1])  # the workflow, as JSON


@pytest.mark.parametrize(("dag_id", "reason"), [
    (PLAIN_DAG, b"is not built from a ComfyUI workflow file"),
    ("no_such_dag", b"there is no DAG 'no_such_dag'"),
    (ESCAPING_DAG, b"a symbolic link out of the folder is never followed"),
])
def test_only_a_workflow_dags_own_file_in_the_folder_is_served(gallery: Gallery, dag_id: str, reason: bytes):
    for path in (f"/comfy/workflows/{dag_id}", f"/comfy/workflows/{dag_id}/sidecar"):
        status, body, _ = gallery.request("GET", path, user="admin")
        assert status == 404, (path, status, body[:300])
        assert b'"nodes"' not in body and b"class_type" not in body  # never a workflow's bytes
    status, body, _ = gallery.request("GET", f"/comfy/workflows/{dag_id}", user="admin")
    assert reason in body, body


def _links(gallery: Gallery, run_id: str, task_id: str) -> dict[str, str | None]:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/links"
    return gallery.json(path)["extra_links"]


def _store_bytes(gallery: Gallery, dag_id: str, run_id: str, path: str) -> bytes:
    from airflow_comfy.artifacts.layout import run_prefix

    return (gallery.store / run_prefix(f"{dag_id}/{run_id}") / path).read_bytes()


def test_extra_links_open_the_runs_image_and_snapshot(gallery: Gallery):
    run = gallery.run_entry(FIRST_RUN)
    assert len(run["images"]) == 1
    image = run["images"][0]
    saver = image["task_id"]
    links = _links(gallery, FIRST_RUN, saver)
    image_url, snapshot_url = links["Output images"], links["Run snapshot"]
    assert urlsplit(image_url).path.startswith(f"/comfy/runs/{DAG_ID}/")
    status, data, headers = gallery.request("GET", urlsplit(image_url).path, user="viewer")
    assert status == 200 and headers["content-type"] == "image/png"
    assert data == _store_bytes(gallery, DAG_ID, FIRST_RUN, image["path"])
    status, data, _ = gallery.request("GET", urlsplit(snapshot_url).path, user="viewer")
    assert status == 200 and json.loads(data)["workflow"]
    others = [task["task_id"] for task in run["tasks"] if task["task_id"] != saver]
    assert others, run["tasks"]  # img2img's other groups wrote tensors, not images: no links
    for task_id in others:
        assert not any(_links(gallery, FIRST_RUN, task_id).values()), task_id


def test_gallery_lists_the_run_with_params_tier_timings_and_thumbnails(gallery: Gallery):
    run = gallery.run_entry(FIRST_RUN)
    assert run["state"] == "success" and run["params"]["seed"] is not None
    assert all(task["seconds"] and task["seconds"] > 0 for task in run["tasks"])
    status, page, _ = gallery.request("GET", f"/comfy/gallery?dag_id={DAG_ID}&run_id={RUN_SEGMENT}", user="viewer")
    text = page.decode()
    assert status == 200 and 'class="comfy-run-tier">default<' in text and 'class="comfy-thumb"' in text
    thumb = f"/comfy/runs/{DAG_ID}/{RUN_SEGMENT}/thumbs/{run['images'][0]['path']}"
    status, data, _ = gallery.request("GET", thumb, user="viewer")
    assert status == 200
    assert Image.open(io.BytesIO(data)).format == "PNG"
    # narrowed to one task (where the "Output images" link of a task with several images leads)
    by_task = "/comfy/api/runs?dag_id={}&run_id={}&task_id={}".format(DAG_ID, RUN_SEGMENT, "{}")
    saver = run["images"][0]["task_id"]
    assert len(gallery.json(by_task.format(saver), user="viewer")["runs"]) == 1
    other = next(task["task_id"] for task in run["tasks"] if task["task_id"] != saver)
    assert gallery.json(by_task.format(other), user="viewer")["runs"] == []


@pytest.mark.parametrize("path", [
    "../../../../secret.png",
    "outputs/../../../../../secret.png",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.png",
    "..%2f..%2f..%2f..%2fsecret.png",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "outputs/leak.png",
])
def test_paths_never_read_outside_the_runs_folder(gallery: Gallery, path: str):
    from airflow_comfy.artifacts.layout import run_prefix

    outputs = gallery.store / run_prefix(f"{DAG_ID}/{FIRST_RUN}") / "outputs"
    leak = outputs / "leak.png"
    if not leak.is_symlink():
        leak.symlink_to(gallery.home / "secret.png")
    for route in ("files", "thumbs"):
        status, body, _ = gallery.request("GET", f"/comfy/runs/{DAG_ID}/{RUN_SEGMENT}/{route}/{path}", user="admin")
        assert status in (400, 404), (route, path, status)
        assert b"not for your eyes" not in body


def test_upload_names_the_image_of_the_next_run(gallery: Gallery):
    status, body = gallery.upload("not-an-image.png", b"hello")
    assert status == 400 and b"does not hold a PNG" in body
    red = _png((220, 30, 30))
    status, body = gallery.upload("../../red square.png", red)
    assert status == 201, body
    answer = json.loads(body)
    assert answer["name"].startswith("upload-") and "/" not in answer["name"]
    # no input store here: the page says the input folder, and the bare name is what the form takes
    assert (answer["where"], answer["value"]) == ("input_path", answer["name"])
    status, page, _ = gallery.request("GET", "/comfy/upload", user="admin")
    assert status == 200 and b'id="comfy-upload-target" data-where="input_path"' in page
    assert (gallery.inputs / answer["name"]).read_bytes() == red
    assert gallery.upload("../../red square.png", red)[0] == 201  # the same bytes again: the same name
    assert gallery.trigger_and_wait("gallery_uploaded", {"image": answer["name"]}) == "success"
    run = gallery.run_entry("gallery_uploaded")
    assert run["params"]["image"] == answer["name"]
    first = gallery.run_entry(FIRST_RUN)["images"][0]["path"]
    second = run["images"][0]["path"]
    assert (_store_bytes(gallery, DAG_ID, "gallery_uploaded", second)
            != _store_bytes(gallery, DAG_ID, FIRST_RUN, first))


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def test_presigned_link_of_an_s3_image(monkeypatch: pytest.MonkeyPatch):
    """A task on an s3:// store links its one image by a presigned URL that anyone may GET (moto's server)."""
    from s3_server import moto_s3_server

    from airflow_comfy.artifacts.errors import ArtifactNotFound
    from airflow_comfy.artifacts.layout import image_key, snapshot_key
    from airflow_comfy.artifacts.store import open_store
    from airflow_comfy.gallery import app
    from airflow_comfy.gallery.paths import BadPath
    from airflow_comfy.operators.links import MANIFEST_ATTRIBUTE, output_images_url, run_snapshot_url
    from airflow_comfy.operators.local import ComfyGroupLocalOperator

    with moto_s3_server() as endpoint:
        for name, value in (("AWS_ACCESS_KEY_ID", "gallery-key"), ("AWS_SECRET_ACCESS_KEY", "gallery-secret"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL_S3", endpoint)):
            monkeypatch.setenv(name, value)
        store = open_store("s3://gallery-bucket/comfy")
        store.client.create_bucket(Bucket="gallery-bucket")
        run_key = "s3dag/manual__2026-11-27T00:00:00+00:00"
        png = _png((10, 200, 10))
        uri = store.put_bytes(image_key(run_key, "ComfyUI_00001_.png"), png)
        store.put_json(snapshot_key(run_key, "decode"), {"workflow": "s3dag"})
        operator = ComfyGroupLocalOperator(task_id="decode", arguments=[], store="s3://gallery-bucket/comfy")
        image = {"node": "9", "uri": uri, "filename": "ComfyUI_00001_.png", "width": 64, "height": 64,
                 "sha256": "0" * 64}
        setattr(operator, MANIFEST_ATTRIBUTE, {"run_key": run_key, "group": "decode", "images": [image]})
        dag_id, run_id = run_key.split("/", 1)
        url = output_images_url(operator, dag_id, run_id, "decode", "")
        assert url.startswith(endpoint) and "Signature" in url
        with urllib.request.urlopen(url, timeout=30) as response:  # no credentials: the URL is the permission
            assert response.read() == png
        with urllib.request.urlopen(run_snapshot_url(operator, dag_id, run_id, ""), timeout=30) as response:
            assert json.loads(response.read()) == {"workflow": "s3dag"}
        # browsers reach the store at another address than the workers: the link names that one
        public = endpoint.replace("127.0.0.1", "localhost")
        monkeypatch.setenv("AIRFLOW__COMFY__LINK_ENDPOINT_URL", public)
        public_url = output_images_url(operator, dag_id, run_id, "decode", "")
        assert public_url.startswith(public + "/gallery-bucket/comfy/runs/s3dag/")
        with urllib.request.urlopen(public_url, timeout=30) as response:
            assert response.read() == png
        monkeypatch.delenv("AIRFLOW__COMFY__LINK_ENDPOINT_URL")
        setattr(operator, MANIFEST_ATTRIBUTE, {"run_key": run_key, "group": "decode", "images": [image, image]})
        several = output_images_url(operator, dag_id, run_id, "decode", "https://airflow.example")
        assert several.startswith("https://airflow.example/comfy/gallery?dag_id=s3dag&run_id=manual__")
        setattr(operator, MANIFEST_ATTRIBUTE, {"run_key": run_key, "group": "decode", "images": []})
        assert output_images_url(operator, dag_id, run_id, "decode", "") == ""
        assert run_snapshot_url(operator, dag_id, run_id, "") == ""

        # the api-server reads the same store for the gallery's file routes, confined to the run's folder
        monkeypatch.setenv("AIRFLOW__COMFY__ARTIFACT_STORE", "s3://gallery-bucket/comfy")
        app.artifact_store.cache_clear()
        try:
            assert app.read_run_object(dag_id, run_id, "outputs/ComfyUI_00001_.png")[1] == png
            with pytest.raises(BadPath):
                app.read_run_object(dag_id, run_id, "../../other-bucket/x.png")
            with pytest.raises(ArtifactNotFound):
                app.read_run_object(dag_id, run_id, "outputs/missing.png")
        finally:
            app.artifact_store.cache_clear()


def test_both_group_operators_carry_the_links():
    from airflow_comfy.operators.local import ComfyGroupLocalOperator
    from airflow_comfy.operators.pod import ComfyGroupPodOperator

    for operator in (ComfyGroupLocalOperator, ComfyGroupPodOperator):
        assert [link.name for link in operator.operator_extra_links] == ["Output images", "Run snapshot"]


def test_the_ui_gets_the_views_and_links(gallery: Gallery):
    """What the UI builds its Browse entries, the DAG run tab and the link buttons from."""
    plugins = {plugin["name"]: plugin for plugin in gallery.json("/api/v2/plugins", user="viewer")["plugins"]}
    views = {(view["destination"], view["href"]) for view in plugins["airflow_comfy"]["external_views"]}
    assert ("nav", "/comfy/gallery") in views and ("nav", "/comfy/upload") in views
    assert ("dag_run", "/comfy/gallery?dag_id={DAG_ID}&run_id={RUN_ID}") in views
    assert [app["url_prefix"] for app in plugins["airflow_comfy"]["fastapi_apps"]] == ["/comfy"]
    saver = gallery.run_entry(FIRST_RUN)["images"][0]["task_id"]
    # the UI's link buttons come from the task instance's links (names -> URLs; the task endpoint lists none)
    assert set(_links(gallery, FIRST_RUN, saver)) == {"Output images", "Run snapshot"}


def test_plugin_and_gallery_import_light():
    """Airflow imports the plugin in every process: no FastAPI there, and no torch on the api-server's side."""
    code = ("import sys\nimport airflow_comfy.plugins\n"
            "assert 'fastapi' not in sys.modules, 'the plugin imported fastapi'\n"
            "import airflow_comfy.gallery.app, airflow_comfy.operators.links\n"
            "assert 'torch' not in sys.modules, 'the gallery imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "a/./b", "a/../b", "..", "a\\b", "c:/x", "a\x00b"])
def test_bad_paths_are_refused_with_a_sentence(path: str):
    from airflow_comfy.gallery.paths import BadPath, run_object_key

    with pytest.raises(BadPath, match=r"^the path "):
        run_object_key("dag", "run", path)


def test_upload_names_are_flat_hashed_and_checked():
    from airflow_comfy.gallery.paths import BadPath, upload_name

    png = b"\x89PNG\r\n\x1a\n" + b"x" * 10
    name = upload_name("..\\../my photo.PNG", png)
    assert name.startswith("upload-") and name.endswith("-my_photo.png") and "/" not in name
    assert upload_name("other.png", png).split("-")[1] == name.split("-")[1]
    with pytest.raises(BadPath, match="not a PNG, JPEG or WebP file name"):
        upload_name("x.svg", b"<svg/>")
    with pytest.raises(BadPath, match="does not hold a JPEG image"):
        upload_name("x.jpg", png)
