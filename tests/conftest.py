"""Shared test setup.

Airflow reads its configuration when it is first imported, so this file (which pytest loads before any test
module) points every test, and every subprocess a test starts, at a throw-away ``AIRFLOW_HOME`` with its own
SQLite database and no example DAGs, and drops ``AIRFLOW__COMFY__*`` settings inherited from the caller's
shell so that the provider's documented defaults apply (but for the runner services' runtime folder: one of
the session's own, whose services are stopped at the end).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from statsd_listener import StatsdListener

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="airflow-comfy-tests-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
#: The runner services' runtime folder of this session (short: socket paths are limited to 107 bytes); the services
#: that local tasks start there are stopped at the end.
RUNNER_SERVICES = Path(tempfile.mkdtemp(prefix="acs-", dir="/tmp"))


def _stop_runner_services() -> None:
    from airflow_comfy.runner_service.client import stop_all

    stop_all(RUNNER_SERVICES)
    shutil.rmtree(RUNNER_SERVICES, ignore_errors=True)


atexit.register(_stop_runner_services)
AIRFLOW_BIN = str(Path(sys.executable).with_name("airflow"))


def _airflow_env(home: Path, dags_folder: Path | None = None, **comfy: str) -> dict[str, str]:
    """Environment for an Airflow rooted at ``home``; ``comfy`` sets ``[comfy]`` options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__COMFY__")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or home / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__COMFY__RUNNER_SERVICE_DIR": str(RUNNER_SERVICES),
    })
    env.update({f"AIRFLOW__COMFY__{name.upper()}": value for name, value in comfy.items()})
    return env


for _name in [k for k in os.environ if k.startswith("AIRFLOW__COMFY__")]:
    del os.environ[_name]
os.environ.update(_airflow_env(AIRFLOW_HOME))


@pytest.fixture(scope="session")
def airflow_env() -> Callable[..., dict[str, str]]:
    """``airflow_env(home, dags_folder=None, **comfy_options)``: the environment of a separate Airflow
    installation rooted at ``home`` (for subprocesses)."""
    return _airflow_env


@pytest.fixture(scope="session")
def run_airflow() -> Callable[..., subprocess.CompletedProcess]:
    """Run the ``airflow`` CLI of this virtualenv: ``run_airflow("dags", "list", env=...)``; fails the test
    (showing its output) unless it exits with ``returncode``."""

    def run(*args: str, env: dict[str, str] | None = None, returncode: int = 0,
            timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([AIRFLOW_BIN, *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == returncode, (
            f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
        return proc

    return run


# --- demo models and input images for runs of the example workflows (the runner's end-to-end tests) -------------


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the tiny random-weight demo models (``airflow-comfy make-demo-models``), built once
    per session (about ten seconds, most of it importing diffusers)."""
    from airflow_comfy.runner.models.demo import make_demo_models

    root = tmp_path_factory.mktemp("demo-models")
    make_demo_models(root)
    return root


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The input folder the example workflows read: ``demo-input.png`` (an RGB 64×64 gradient with a dark square
    and a light disc on it, so that Canny finds edges) and ``demo-mask.png`` (a white disc on black, 64×64)."""
    from airflow_comfy.runner.models.demo import write_demo_inputs

    root = tmp_path_factory.mktemp("demo-input")
    write_demo_inputs(root)
    return root


# --- a PostgreSQL server for the tests that run Airflow's real scheduler (tests/postgres.py) ----------------------


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of this test session's own, on a free loopback port, removed at the end. Fails (never
    skips) with the command that installs the server binaries when they are missing."""
    from postgres import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


# --- the fault suite's table (tests/test_faults.py) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def statsd() -> Iterator[StatsdListener]:
    """A StatsD server of the test's own: a UDP socket on 127.0.0.1 that keeps every metric line it receives."""
    listener = StatsdListener()
    try:
        yield listener
    finally:
        listener.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the fault suite's cases and outcomes, when it ran (visible with ``-q`` too)."""
    import fault_table

    lines = fault_table.lines()
    if lines:
        terminalreporter.section("fault suite: cases and outcomes")
        for line in lines:
            terminalreporter.write_line(line)
