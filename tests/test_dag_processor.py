"""Bad workflow files in a deployment: Airflow's real dag-processor and its metadata database.

A ``DagBag`` does not show what a deployment shows: when a file has an import error, the dag-processor marks
every DAG of that file stale (deactivated, untriggerable). These tests run ``airflow dag-processor -n 1`` (one
pass over the dags folder, as in a deployment) against a real metadata database after each change to the
folder, then read ``DagModel`` and ``ParseImportError`` from it, trigger DAGs with ``airflow dags trigger``,
and compare with what ``airflow-comfy check`` says.

The story: a folder of good workflows is processed; bad files of every kind are dropped in (and a good
workflow is edited into a bad one); the good DAGs stay active and triggerable while each bad file is named in
the error stub's import error; then the bad files are fixed or removed and their DAGs come back, the import
error gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workflow_builders import EXAMPLES, REPO, TEMPLATES, txt2img

pytestmark = pytest.mark.airflow

STUBS = [REPO / "dags" / "comfy_workflows.py", REPO / "dags" / "comfy_workflow_errors.py"]
ERROR_STUB = STUBS[1].name
GOOD = {  # file -> its dag id
    "txt2img.json": "txt2img", "txt2img_api.json": "txt2img_api", "img2img.json": "img2img",
    "default.json": "default",
}
DEFAULT_TEXT = (TEMPLATES / "default.json").read_text(encoding="utf-8")
HUGE_BYTES = 6 * 1024 * 1024  # over the default [comfy] max_workflow_bytes of 5 MB

STATE_SCRIPT = textwrap.dedent("""
    import json
    from airflow.models import DagModel
    from airflow.models.errors import ParseImportError
    from airflow.utils.session import create_session
    with create_session() as session:
        dags = {d.dag_id: {"stale": bool(d.is_stale), "import_errors": bool(d.has_import_errors),
                           "file": d.relative_fileloc} for d in session.query(DagModel)}
        errors = {e.filename: e.stacktrace for e in session.query(ParseImportError)}
    print("STATE " + json.dumps({"dags": dags, "errors": errors}))
""")


class Deployment:
    """An Airflow home with a metadata database and a dags folder holding the two stubs."""

    def __init__(self, home: Path, airflow_env, run_airflow):
        self.home = home
        self.dags = home / "dags"
        self.dags.mkdir(parents=True)
        for stub in STUBS:
            shutil.copy(stub, self.dags / stub.name)
        self.env = airflow_env(home, self.dags, cache_dir=str(home / "comfy-cache"))
        # A DAG that a file stops making is deactivated by the dag-processor's periodic stale check: by default
        # within stale_dag_threshold (50 s) of the next parse, checked every parsing_cleanup_interval (60 s).
        # The same check runs here on every loop with a 1 s threshold, so that one pass shows it.
        self.env.update({"AIRFLOW__DAG_PROCESSOR__STALE_DAG_THRESHOLD": "1",
                         "AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL": "0"})
        self.run_airflow = run_airflow
        run_airflow("db", "migrate", env=self.env)

    def process(self) -> None:
        """One pass of the real dag-processor over the folder (each file parsed in its own process)."""
        self.run_airflow("dag-processor", "-n", "1", env=self.env, timeout=300)

    def state(self) -> dict:
        proc = subprocess.run([sys.executable, "-c", STATE_SCRIPT], env=self.env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("STATE "))
        return json.loads(line.removeprefix("STATE "))

    def active(self) -> set[str]:
        return {dag_id for dag_id, d in self.state()["dags"].items() if not d["stale"]}

    def trigger(self, dag_id: str) -> None:
        proc = self.run_airflow("dags", "trigger", dag_id, "-o", "json", env=self.env)
        run = json.loads(proc.stdout[proc.stdout.index("[{"):])[0]
        assert run["dag_id"] == dag_id and run["state"] == "queued", run

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "airflow_comfy.cli", "check", str(self.dags)], env=self.env,
                              capture_output=True, text=True, timeout=180)


def write_good(folder: Path) -> None:
    for name in ("txt2img.json", "txt2img_api.json", "img2img.json"):
        shutil.copy(EXAMPLES / name, folder / name)
    (folder / "default.json").write_text(DEFAULT_TEXT, encoding="utf-8")


def unknown_node_doc() -> dict:
    doc = txt2img()
    doc["8"]["class_type"] = "NoSuchDecoder"
    return doc


def huge_workflow() -> str:
    """A valid API workflow over 5 MB: a prompt of long text."""
    return json.dumps(txt2img(**{"6.text": "a lighthouse at dusk, " * (HUGE_BYTES // 22 + 1)}))


BAD_FILES = {
    # file -> (how it is made, fragments of its block in the import error)
    "truncated.json": (lambda p: p.write_text(DEFAULT_TEXT[: len(DEFAULT_TEXT) // 2]), ["not valid JSON"]),
    "not_json.json": (lambda p: p.write_bytes(bytes(range(256)) * 40), ["the file is not UTF-8 text"]),
    "top_list.json": (lambda p: p.write_text("[1, 2, 3]"), ["the top level is a JSON list"]),
    "unknown_node.json": (lambda p: p.write_text(json.dumps(unknown_node_doc())),
                          ["unknown node types", "NoSuchDecoder (node 8)"]),
    "steps_zero.json": (lambda p: p.write_text(json.dumps(txt2img(**{"3.steps": 0}))),
                        ["node 3 (KSampler): input 'steps'", "smaller than min of 1"]),
    "huge.json": (lambda p: p.write_text(huge_workflow()), ["the limit is 5,000,000 bytes, [comfy] max_workflow_bytes"]),
    "dangling.json": (lambda p: p.symlink_to(p.with_name("nowhere.json")), ["cannot read the file"]),
    "fifo.json": (lambda p: os.mkfifo(p), ["not a regular file"]),
    "styled.json": (lambda p: (p.write_text(json.dumps(txt2img())),
                               p.with_name("styled.comfy.yaml").write_text("tags: [a, b\n")), []),
}
ERROR_FILES = {name: name for name in BAD_FILES} | {"styled.json": "styled.comfy.yaml"}
BAD_FRAGMENTS = {name: fragments for name, (_, fragments) in BAD_FILES.items()}
BAD_FRAGMENTS["styled.json"] = ["sidecar: invalid YAML"]


def blocks_of(error_text: str, folder: Path) -> dict[str, str]:
    """``{file name: its message}`` from the error stub's import error."""
    message = error_text.partition("airflow_comfy.ComfyWorkflowImportError: ")[2]
    assert message.startswith("airflow-comfy: "), error_text[-3000:]
    _, *blocks = message.split(f"\n\n{folder}/")
    return dict(block.partition(": ")[::2] for block in blocks)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, airflow_env, run_airflow) -> Deployment:
    return Deployment(tmp_path_factory.mktemp("deployment"), airflow_env, run_airflow)


def test_good_folder_is_processed_into_active_dags(deployment: Deployment):
    write_good(deployment.dags)
    deployment.process()
    state = deployment.state()
    assert {d for d, s in state["dags"].items() if not s["stale"]} == set(GOOD.values())
    assert all(s["file"] == "comfy_workflows.py" and not s["import_errors"] for s in state["dags"].values())
    assert state["errors"] == {}
    deployment.trigger("txt2img")


def test_bad_files_never_deactivate_the_good_dags(deployment: Deployment):
    for name, (make, _) in BAD_FILES.items():
        make(deployment.dags / name)
    (deployment.dags / "a_folder.json").mkdir()  # a folder is not a workflow: skipped, not an error
    deployment.process()
    state = deployment.state()
    assert {d for d, s in state["dags"].items() if not s["stale"]} == set(GOOD.values())
    assert not any(state["dags"][d]["import_errors"] for d in GOOD.values())
    assert list(state["errors"]) == [ERROR_STUB]
    blocks = blocks_of(state["errors"][ERROR_STUB], deployment.dags)
    assert set(blocks) == set(ERROR_FILES.values())
    for name, fragments in BAD_FRAGMENTS.items():
        for fragment in fragments:
            assert fragment in blocks[ERROR_FILES[name]], (name, fragment, blocks[ERROR_FILES[name]])
    for dag_id in GOOD.values():
        deployment.trigger(dag_id)  # "Dag ... not found" if the dag-processor had deactivated it


def test_check_says_what_airflow_shows(deployment: Deployment):
    state = deployment.state()
    result = deployment.check()
    assert result.returncode == 2, result.stderr[-3000:]
    out = result.stdout
    shown = {line.split()[0] for line in out.split("Import errors:")[0].splitlines()[1:] if line.strip()}
    assert shown == {d for d, s in state["dags"].items() if not s["stale"]}
    assert f"  {ERROR_STUB}: ComfyWorkflowImportError: " in out
    error_text = state["errors"][ERROR_STUB]
    message = error_text.partition("airflow_comfy.ComfyWorkflowImportError: ")[2].strip()
    assert message.replace("\n", "\n    ") in out  # the same message, block for block


def test_a_good_workflow_edited_into_a_bad_one_loses_its_dag_until_fixed(deployment: Deployment):
    path = deployment.dags / "txt2img_api.json"
    good_text = path.read_text()
    doc = json.loads(good_text)
    assert doc["5"]["class_type"] == "KSampler"
    doc["5"]["inputs"]["steps"] = 0
    path.write_text(json.dumps(doc))
    deployment.process()
    state = deployment.state()
    assert state["dags"]["txt2img_api"]["stale"]  # as a Python DAG file that stops importing
    assert {d for d, s in state["dags"].items() if not s["stale"]} == set(GOOD.values()) - {"txt2img_api"}
    blocks = blocks_of(state["errors"][ERROR_STUB], deployment.dags)
    assert "node 5 (KSampler): input 'steps'" in blocks["txt2img_api.json"]
    path.write_text(good_text)


def test_fixed_or_removed_bad_files_bring_their_dags_back_and_clear_the_error(deployment: Deployment):
    for name in BAD_FILES:
        (deployment.dags / name).unlink()
    (deployment.dags / "styled.comfy.yaml").write_text("tags: [a, b]\n")
    (deployment.dags / "styled.json").write_text(json.dumps(txt2img()))  # fixed: its sidecar is valid now
    deployment.process()
    state = deployment.state()
    assert {d for d, s in state["dags"].items() if not s["stale"]} == set(GOOD.values()) | {"styled"}
    assert state["errors"] == {}
    deployment.trigger("txt2img_api")
    deployment.trigger("styled")
    assert deployment.check().returncode == 0
