"""The deployment the UI tests use a browser on: what ``make demo`` sets up (the example workflows, the tiny demo
models and input images, the local backend with its warm runner service, a ``file://`` artifact store), served by
a real api-server + scheduler + dag-processor (:mod:`airflow_deployment`) with a login: the simple auth manager
with a real user and password, and no "everyone is admin" shortcut.

Plain Python (no pytest), so that a person can start the same stack by hand to look at it::

    python tests/ui_stack.py      # prints the URL, the user and the password; Ctrl-C (or SIGTERM) stops it
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from airflow_deployment import AirflowDeployment

REPO = Path(__file__).resolve().parents[1]
#: The DAG files a deployment copies into its dags folder (README "Install into an existing Airflow 3").
LOADER_STUBS = ("comfy_workflows.py", "comfy_workflow_errors.py")
#: The simple auth manager's user of the UI tests (an admin: it triggers runs and reads logs).
USERNAME = "painter"


@dataclass
class UiStack:
    """One deployment and what a test needs to know about it."""

    deployment: AirflowDeployment
    username: str
    password: str
    artifacts: Path
    inputs: Path
    runner_services: Path

    @property
    def url(self) -> str:
        return self.deployment.url


def build_ui_stack(home: Path, database_url: str, models: Path | None = None) -> UiStack:
    """A deployment rooted at ``home`` on ``database_url`` (already migrated), not started yet. ``models``: a
    folder of demo models to reuse; made under ``home`` when None."""
    from airflow_comfy.runner.models.demo import make_demo_models, write_demo_inputs

    home = Path(home)
    dags, artifacts, inputs = home / "dags", home / "artifacts", home / "input"
    for folder in (dags, artifacts, inputs):
        folder.mkdir(parents=True, exist_ok=True)
    for stub in LOADER_STUBS:
        shutil.copy(REPO / "dags" / stub, dags)
    if models is None:
        models = home / "models"
        make_demo_models(models)
    write_demo_inputs(inputs)
    password = secrets.token_urlsafe(12)
    passwords = home / "simple_auth_manager_passwords.json"
    passwords.write_text(json.dumps({USERNAME: password}))
    # short: the runner service's socket path must fit in 107 bytes
    runner_services = Path(tempfile.mkdtemp(prefix="acui-", dir="/tmp"))
    deployment = AirflowDeployment(home, database_url, dags, env={
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__COMFY__WORKFLOWS_FOLDER": str(REPO / "example_workflows"),
        "AIRFLOW__COMFY__ARTIFACT_STORE": f"file://{artifacts}",
        "AIRFLOW__COMFY__MODELS_PATH": str(models),
        "AIRFLOW__COMFY__INPUT_PATH": str(inputs),
        "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
        "AIRFLOW__COMFY__RUNNER_PYTHON": sys.executable,
        "AIRFLOW__COMFY__RUNNER_SERVICE_DIR": str(runner_services),
        "AIRFLOW__COMFY__RUNNER_SERVICE_IDLE_TIMEOUT": "60",
        "HF_HUB_OFFLINE": "1",
    })
    return UiStack(deployment, USERNAME, password, artifacts, inputs, runner_services)


def stop_runner_services(stack: UiStack) -> None:
    """The warm runner service the local tasks started outlives them: stop it, by the socket it serves."""
    from airflow_comfy.runner_service.client import stop_all

    stop_all(stack.runner_services)
    shutil.rmtree(stack.runner_services, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    from postgres import PostgresServer, migrated_airflow_database

    signal.signal(signal.SIGTERM, _interrupt)  # a background job ignores SIGINT: stop cleanly on SIGTERM too
    home = Path(tempfile.mkdtemp(prefix="airflow-comfy-ui-"))
    with PostgresServer() as server:
        database = migrated_airflow_database(server, "ui", {**os.environ, "AIRFLOW_HOME": str(home)},
                                             airflow_bin=str(Path(sys.executable).with_name("airflow")))
        stack = build_ui_stack(home, database)
        try:
            with stack.deployment as deployment:
                deployment.wait_for_api()
                print(f"UI: {stack.url}  user: {stack.username}  password: {stack.password}  home: {home}",
                      flush=True)
                deployment.wait_for("Ctrl-C", lambda: False, timeout=24 * 3600, interval=5)
        except KeyboardInterrupt:
            pass
        finally:
            stop_runner_services(stack)


if __name__ == "__main__":
    main()
