"""The Airflow UI as a person uses it, in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright; tests/browser.py) against a real api-server + scheduler + dag-processor on PostgreSQL, set up as
``make demo`` sets it up (tests/ui_stack.py: the example workflows, the demo models, the local backend), with a
login through the simple auth manager's login page. Checked: the login (and a wrong password refused), the DAG
list, the trigger form's params and tier, a run triggered from the form, its log and XCom, the task's "Output
images" extra link, the gallery inside the UI (Browse → "ComfyUI outputs", and the run page's tab of that name,
both the plugin's pages in the UI's iframe, logged in by the UI's cookie), an image uploaded through Browse →
"Upload input image" read by the img2img run triggered from the form with the name the page returned, and that
an anonymous gallery request is refused.

One deployment, one browser and one logged-in page serve every check of this module (module-scoped fixtures);
the checks run in file order and later ones use what earlier ones left (the run triggered from the form). To add
a check, write a test that takes what it needs:

* ``page``: the logged-in Playwright page (go anywhere with ``page.goto(ui.url + "/...")``);
* ``ui``: the :class:`ui_stack.UiStack` (URL, user, password, artifact and input folders, and
  ``ui.deployment.rest(...)``, already logged in);
* ``form_run``: the txt2img run triggered from the trigger form and finished (:class:`FormRun`);
* ``shots``: ``shots.take(page, "NN-what")`` saves a screenshot (``make screenshots`` refreshes docs/screenshots).

Waits are explicit (Playwright's ``expect`` on elements, the deployment's ``wait_for`` on the REST API); nothing
sleeps. Chromium missing is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
from browser import VIEWPORT, ChromiumUnavailable, Screenshots, find_chromium, launch_arguments
from postgres import migrated_airflow_database
from ui_stack import REPO, UiStack, build_ui_stack, stop_runner_services

pytestmark = pytest.mark.airflow

#: Every example workflow becomes a DAG named after its file.
EXAMPLE_DAGS = sorted(path.stem for path in (REPO / "example_workflows").glob("*.json"))
#: How long one element may take to show up (the UI fetches everything after the page loads).
ELEMENT_TIMEOUT_MS = 30_000
#: A txt2img run of the demo models takes about 20 s on two busy cores; the rest is margin.
RUN_TIMEOUT_S = 240
TIERS = ("vip", "high", "normal", "batch")
#: The example DAG with an ``image`` param (its LoadImage node's input), and the run an upload feeds.
IMG2IMG = "img2img"
UPLOAD_RUN_ID = "from-an-upload"


@dataclass
class FormRun:
    """The run :func:`form_run` triggered from the trigger form, once it finished."""

    dag_id: str
    run_id: str
    prompt: str
    tier: str
    state: str
    conf: dict

    def page(self, ui: UiStack, task_id: str | None = None, tab: str = "") -> str:
        """The UI address of this run (or of one of its tasks, optionally a tab such as ``xcom``)."""
        url = f"{ui.url}/dags/{self.dag_id}/runs/{self.run_id}"
        if task_id:
            url += f"/tasks/{task_id}"
        return f"{url}/{tab}" if tab else url


# --- fixtures: one deployment, one browser, one logged-in page --------------------------------------------------


@pytest.fixture(scope="session")  # session: pytest sets it up before the session's PostgreSQL server
def chromium() -> str:
    try:
        return find_chromium()
    except ChromiumUnavailable as exc:
        missing = str(exc)
    pytest.fail(missing, pytrace=False)  # outside the except: the reason alone, not a chained traceback


@pytest.fixture(scope="module")
def ui(chromium: str, postgres_server, demo_models: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiStack]:
    """The deployment (started after ``chromium`` was found: no minute spent on a deployment that cannot be
    looked at), ready when the dag-processor has serialized every example and the api-server answers."""
    started = time.monotonic()
    home = tmp_path_factory.mktemp("ui-airflow")
    database = migrated_airflow_database(postgres_server, "ui", {**os.environ, "AIRFLOW_HOME": str(home)},
                                         airflow_bin=str(Path(sys.executable).with_name("airflow")))
    stack = build_ui_stack(home, database, models=demo_models)
    try:
        with stack.deployment as deployment:
            deployment.wait_for_api()
            deployment.wait_for_dags(EXAMPLE_DAGS)
            deployment.log_in(stack.username, stack.password)
            print(f"deployment ready in {time.monotonic() - started:.1f} s")
            yield stack
    finally:
        stop_runner_services(stack)


@pytest.fixture(scope="module")
def browser(chromium: str):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None:
        pytest.fail("The UI tests need the playwright package (the dev extra): pip install -e '.[dev]'. "
                    "Never run `playwright install`: the tests use Debian's chromium.", pytrace=False)
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=launch_arguments())
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("ui-screenshots"))


@pytest.fixture(scope="module")
def page(browser, ui: UiStack, shots: Screenshots):
    """One page, logged in through the login page as a person does: open the UI, be sent to the login form,
    type the user and password, press "Sign in", land on the UI."""
    from playwright.sync_api import expect

    expect.set_options(timeout=ELEMENT_TIMEOUT_MS)
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(ELEMENT_TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(ui.url + "/")
        expect(page).to_have_url(re.compile(r"/auth/login"))
        page.locator("input[name=username]").fill(ui.username)
        page.locator("input[name=password]").fill(ui.password)
        shots.take(page, "01-login")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="User")).to_be_visible()
        assert urlparse(page.url).path.rstrip("/") == "", page.url
        yield page
    finally:
        context.close()


@pytest.fixture(scope="module")
def form_run(page, ui: UiStack, shots: Screenshots) -> FormRun:
    """txt2img triggered from its trigger form (a prompt typed in, the tier picked, a run id given), then waited
    on through the REST API until it finished."""

    run = FormRun("txt2img", "from-the-form", "a red fox in the snow, woodcut", "high", "", {})
    dialog = open_trigger_form(page, ui, run.dag_id)
    dialog.locator("#element_prompt").fill(run.prompt)
    pick_option(page, dialog, "tier", run.tier)
    trigger(page, dialog, run)
    return finish(ui, run)


def trigger(page, dialog, run: FormRun) -> None:
    """Give the run its id (under Advanced Options), press Trigger, land on the new run's page."""
    from playwright.sync_api import expect

    dialog.get_by_role("button", name="Advanced Options").click()
    dialog.locator("input[name=dagRunId]").fill(run.run_id)
    dialog.get_by_role("button", name="Trigger", exact=True).click()
    expect(dialog).to_be_hidden()
    expect(page).to_have_url(re.compile(f"/dags/{run.dag_id}/runs/{run.run_id}$"))


def finish(ui: UiStack, run: FormRun) -> FormRun:
    """``run`` once it finished (success or failed), its state and conf read through the REST API."""

    def finished() -> dict | None:
        status, body = ui.deployment.rest("GET", f"/api/v2/dags/{run.dag_id}/dagRuns/{run.run_id}")
        return body if status == 200 and body["state"] in ("success", "failed") else None

    body = ui.deployment.wait_for(f"run {run.run_id} to finish", finished, timeout=RUN_TIMEOUT_S)
    run.state, run.conf = body["state"], body["conf"]
    return run


def failed_run_report(ui: UiStack, run: FormRun, lines: int = 40) -> str:
    """Why a run did not succeed: each task's state and the end of the log of each that failed (REST API)."""
    base = f"/api/v2/dags/{run.dag_id}/dagRuns/{run.run_id}/taskInstances"
    report = [f"run {run.run_id}: {run.state}"]
    for ti in ui.deployment.rest("GET", base)[1].get("task_instances", []):
        report.append(f"task {ti['task_id']}: {ti['state']}")
        if ti["state"] in ("failed", "up_for_retry"):
            status, log = ui.deployment.rest("GET", f"{base}/{ti['task_id']}/logs/{max(ti['try_number'], 1)}")
            events = [entry.get("event", "") for entry in (log or {}).get("content", [])] if status == 200 else []
            report += events[-lines:]
    return "\n".join(report)


# --- helpers: the UI's widgets ---------------------------------------------------------------------------------


def open_trigger_form(page, ui: UiStack, dag_id: str):
    """The DAG's page, its Trigger button pressed: the trigger dialog, with the run parameters shown."""
    from playwright.sync_api import expect

    page.goto(f"{ui.url}/dags/{dag_id}")
    page.get_by_test_id("trigger-dag-button").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text(f"Trigger Dag - {dag_id}")).to_be_visible()
    expect(dialog.get_by_text("Run Parameters")).to_be_visible()
    return dialog


def param_field(page, dialog, name: str):
    """The row of one param in the trigger form (its label, its input and its description): the form field
    holding the input named ``element_<name>``."""
    return dialog.locator("[data-scope=field][data-part=root]", has=page.locator(f"[name='element_{name}']"))


def pick_option(page, dialog, name: str, value: str) -> None:
    """Choose ``value`` in the select of enum param ``name`` (a react-select: open it, click the option)."""
    from playwright.sync_api import expect

    dialog.locator(f"[id='element_{name}'] input[aria-autocomplete=list]").click()
    page.get_by_role("option", name=value, exact=True).click()
    expect(dialog.locator(f"input[name='element_{name}']")).to_have_value(value)


def open_browse_view(page, ui: UiStack, name: str, url_route: str, path: str):
    """Browse → ``name`` (one of the plugin's external views, at ``path``) from the UI's home page: the view's
    frame. The UI shows it at ``/plugin/<url_route>``, and once the frame has loaded, appends the frame's own
    path to that address (so that the address leads back to the page the frame shows)."""
    from playwright.sync_api import expect

    page.goto(ui.url + "/")
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name=name, exact=True).click()
    expect(page).to_have_url(re.compile(f"/plugin/{url_route}({re.escape(path)})?$"))
    return plugin_frame(page)


def plugin_frame(page):
    """The frame the UI shows a plugin's external view in (the gallery's pages, served by its FastAPI app)."""
    return page.frame_locator("iframe[src*='/comfy/']")


def expect_thumbnail(run_section, run: FormRun) -> None:
    """The run's section shows its image's thumbnail, loaded (the demo's 64x64 image, not shrunk)."""
    from playwright.sync_api import expect

    thumb = run_section.locator("a.comfy-image img.comfy-thumb")
    expect(thumb).to_have_count(1)
    expect(thumb).to_be_visible()
    expect(thumb).to_have_js_property("complete", True)
    expect(thumb).to_have_js_property("naturalWidth", 64)
    assert f"/comfy/runs/{run.dag_id}/{run.run_id}/thumbs/outputs/" in thumb.get_attribute("src")


def pattern_png(size: int = 64, square: int = 8) -> bytes:
    """A checkerboard of two colours made here: an input image no other test or example has."""
    from PIL import Image

    image = Image.new("RGB", (size, size))
    image.putdata([(200, 40, 40) if (x // square + y // square) % 2 else (30, 60, 180)
                   for y in range(size) for x in range(size)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def snapshot_inputs(ui: UiStack, run: FormRun) -> dict[str, str]:
    """The input images the run's groups read (name -> sha256), from its snapshots in the artifact store."""
    outputs = ui.artifacts / "runs" / run.dag_id / run.run_id / "outputs"
    read: dict[str, str] = {}
    for snapshot in sorted(outputs.glob("snapshot.*.json")):
        read.update(json.loads(snapshot.read_text())["inputs"])
    return read


# --- the checks -------------------------------------------------------------------------------------------------


def test_a_wrong_password_is_refused(browser, ui: UiStack):
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    try:
        login = context.new_page()
        login.goto(ui.url + "/dags")
        login.locator("input[name=username]").fill(ui.username)
        login.locator("input[name=password]").fill(ui.password + "-wrong")
        login.get_by_role("button", name="Sign in").click()
        expect(login.get_by_text("Invalid credentials")).to_be_visible()
        expect(login).to_have_url(re.compile(r"/auth/login"))
    finally:
        context.close()


def test_the_dag_list_shows_the_example_workflows(page, ui: UiStack, shots: Screenshots):
    from playwright.sync_api import expect

    page.goto(ui.url + "/dags")
    expect(page.get_by_text(f"{len(EXAMPLE_DAGS)} Dags", exact=True)).to_be_visible()
    for dag_id in EXAMPLE_DAGS:
        link = page.get_by_role("link", name=dag_id, exact=True)
        expect(link).to_be_visible()
        assert urlparse(link.get_attribute("href")).path.endswith(f"/dags/{dag_id}"), dag_id
    shots.take(page, "02-dag-list")


def test_the_trigger_form_shows_the_generated_params_and_the_tier(page, ui: UiStack, shots: Screenshots):
    from playwright.sync_api import expect

    dialog = open_trigger_form(page, ui, "txt2img")
    shots.take(page, "03-trigger-form")
    # the workflow's widget inputs, with the values the workflow file has and descriptions naming their node
    prompt = param_field(page, dialog, "prompt")
    expect(prompt).to_contain_text("Prompt")
    expect(prompt).to_contain_text("Sets input 'text' of CLIPTextEncode node 2")
    expect(dialog.locator("#element_prompt")).to_have_value("a lighthouse on a cliff at dawn, oil painting")
    for name, label, node, value in (("seed", "Seed", "KSampler node 5", "42"),
                                     ("steps", "Steps", "KSampler node 5", "8"),
                                     ("cfg", "CFG scale", "KSampler node 5", "7"),
                                     ("width", "Width", "EmptyLatentImage node 4 ('Empty Latent Image')", "64")):
        field = param_field(page, dialog, name)
        expect(field).to_contain_text(label)
        expect(field).to_contain_text(f"Sets input '{name}' of {node} for this run.")
        expect(field.locator(f"input[name='element_{name}']")).to_have_value(value)
    # the tier: an enum param defaulting to normal, offering the four tiers and explaining their weights
    tier = param_field(page, dialog, "tier")
    expect(tier).to_contain_text("Tier")
    expect(tier).to_contain_text("vip 10000, high 1000, normal 100, batch 1")
    expect(dialog.locator("input[name=element_tier]")).to_have_value("normal")
    dialog.locator("[id='element_tier'] input[aria-autocomplete=list]").click()
    options = page.get_by_role("option")
    expect(options).to_have_count(len(TIERS))
    assert options.all_inner_texts() == list(TIERS)
    tier.scroll_into_view_if_needed()
    shots.take(page, "04-trigger-form-tier")
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()


def test_a_run_triggered_from_the_form_succeeds(page, ui: UiStack, form_run: FormRun, shots: Screenshots):
    from playwright.sync_api import expect

    assert form_run.state == "success", failed_run_report(ui, form_run)
    # what was typed and picked in the form is the run's conf
    assert form_run.conf["prompt"] == form_run.prompt and form_run.conf["tier"] == form_run.tier, form_run.conf
    page.goto(form_run.page(ui))
    header = page.get_by_text(form_run.run_id, exact=True).last
    expect(header).to_be_visible()
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    expect(page.get_by_text(ui.username, exact=True)).to_be_visible()  # the triggering user
    for task_id in ("inference", "postprocess"):
        expect(page.get_by_role("link", name=task_id, exact=True).first).to_be_visible()
    shots.take(page, "05-run-succeeded")


def test_the_runs_log_and_xcom_show_the_output_image(page, ui: UiStack, form_run: FormRun,
                                                     shots: Screenshots):
    from playwright.sync_api import expect

    output = re.compile(r"file://\S+/runs/txt2img/from-the-form/outputs/txt2img_\d+_\.png")
    # the log of the group that saved it: the SaveImage node's line with the image's address
    page.goto(form_run.page(ui, "postprocess"))
    saved = page.get_by_text(re.compile(r"SaveImage\): saved " + output.pattern)).first
    expect(saved).to_be_visible()
    saved.scroll_into_view_if_needed()
    shots.take(page, "06-task-log")
    uri = output.search(saved.inner_text()).group(0)
    image = Path(urlparse(uri).path)
    assert image.is_file() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", uri
    assert image.is_relative_to(ui.artifacts), uri
    # the task's XCom: the group's manifest, with this image, its address and hash. The UI shows the value in a code
    # editor that draws only the lines in its view (the manifest's per-node stats come before its images), so the
    # value is read as a person copies it: with the row's "Copy to clipboard" button.
    page.goto(form_run.page(ui, "postprocess", "xcom"))
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="return_value", exact=True))
    page.get_by_role("button", name="Expand all extra JSON").click()
    expect(row).to_contain_text('"group": "postprocess"')
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=ui.url)
    row.get_by_role("button", name="Copy to clipboard").click()
    shown = json.loads(page.evaluate("navigator.clipboard.readText()"))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert [(i["filename"], i["uri"], i["sha256"]) for i in shown["images"]] == [(image.name, uri, digest)], shown
    shots.take(page, "07-task-xcom")


# --- outputs in the UI (the plugin: README "Outputs in the UI") -------------------------------------------------


def test_the_extra_link_opens_the_output_image(page, ui: UiStack, form_run: FormRun, shots: Screenshots):
    from playwright.sync_api import expect

    image = next((ui.artifacts / "runs" / form_run.dag_id / form_run.run_id / "outputs").glob("*.png"))
    # the task's Details tab lists its extra links; a link into the UI's own site opens in the same tab
    page.goto(form_run.page(ui, "postprocess", "details"))
    link = page.get_by_role("link", name="Output images")
    expect(link).to_be_visible()
    shots.take(page, "08-extra-links")
    link.click()
    expect(page).to_have_url(re.compile(re.escape(f"/outputs/{image.name}") + "$"))
    # the browser shows the picture itself, and what it got are the store's bytes
    picture = page.locator("img")
    expect(picture).to_have_count(1)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=picture.element_handle())
    assert picture.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    assert page.request.get(page.url).body() == image.read_bytes()


def test_browse_comfyui_outputs_shows_the_run(page, ui: UiStack, form_run: FormRun, shots: Screenshots):
    from playwright.sync_api import expect

    gallery = open_browse_view(page, ui, "ComfyUI outputs", "comfy-gallery", "/comfy/gallery")
    run = gallery.locator(f"section.comfy-run[data-run-id='{form_run.run_id}']")
    expect(run).to_be_visible()
    expect(run.locator(".comfy-run-dag")).to_contain_text(form_run.dag_id)
    expect(run.locator(".comfy-run-tier")).to_contain_text(form_run.tier)
    expect(run.locator("code.comfy-run-params")).to_contain_text(form_run.prompt)
    expect_thumbnail(run, form_run)
    shots.take(page, "09-gallery")


def test_the_runs_comfyui_outputs_tab_shows_its_thumbnail(page, ui: UiStack, form_run: FormRun,
                                                          shots: Screenshots):
    from playwright.sync_api import expect

    page.goto(form_run.page(ui))
    page.get_by_role("link", name="ComfyUI outputs", exact=True).click()
    expect(page).to_have_url(re.compile(re.escape(form_run.page(ui, tab="plugin/comfy-run-gallery")) + "$"))
    gallery = plugin_frame(page)
    # narrowed to this run: its section, and no other run's
    expect(gallery.locator("h1")).to_have_text(f"ComfyUI outputs of {form_run.dag_id} · {form_run.run_id}")
    expect(gallery.locator("section.comfy-run")).to_have_count(1)
    run = gallery.locator(f"section.comfy-run[data-run-id='{form_run.run_id}']")
    expect(run.locator(".comfy-run-state")).to_have_text("success")
    expect_thumbnail(run, form_run)
    shots.take(page, "10-run-outputs-tab")


def test_an_upload_is_usable_in_the_next_run(page, ui: UiStack, shots: Screenshots):
    from playwright.sync_api import expect

    picture = pattern_png()
    upload = open_browse_view(page, ui, "Upload input image", "comfy-upload", "/comfy/upload")
    upload.locator("#comfy-upload-dag").select_option(IMG2IMG)
    upload.locator("#comfy-upload-file").set_input_files(
        {"name": "checkers.png", "mimeType": "image/png", "buffer": picture})
    upload.locator("#comfy-upload-submit").click()
    shown = upload.locator("#comfy-upload-name")
    expect(shown).to_have_text(re.compile(r"^upload-[0-9a-f]{12}-checkers\.png$"))
    shots.take(page, "11-upload")
    name = shown.inner_text()
    assert (ui.inputs / name).read_bytes() == picture, name  # the input folder the workers read
    # the name, typed into img2img's trigger form as its image, is what the next run reads
    run = FormRun(IMG2IMG, UPLOAD_RUN_ID, "", "", "", {})
    dialog = open_trigger_form(page, ui, run.dag_id)
    image = param_field(page, dialog, "image")
    image.locator("input[name=element_image]").fill(name)
    image.scroll_into_view_if_needed()
    shots.take(page, "12-trigger-form-upload")
    trigger(page, dialog, run)
    finish(ui, run)
    assert run.state == "success", failed_run_report(ui, run)
    assert run.conf["image"] == name, run.conf
    read = snapshot_inputs(ui, run)
    assert read.get(name) == hashlib.sha256(picture).hexdigest(), read


def test_an_anonymous_gallery_request_is_refused(browser, ui: UiStack):
    context = browser.new_context(viewport=VIEWPORT)  # no login: no token cookie
    try:
        anonymous = context.new_page()
        for path in ("/comfy/gallery", "/comfy/api/runs?dag_id=txt2img"):
            response = anonymous.goto(ui.url + path)
            assert response is not None and response.status == 401, (path, response and response.status)
    finally:
        context.close()

