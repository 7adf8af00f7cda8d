"""Shared test setup.

Airflow reads its configuration when it is first imported, so this file (which pytest loads before any test
module) points every test, and every subprocess a test starts, at a throw-away ``AIRFLOW_HOME`` with its own
SQLite database and no example DAGs, and drops ``AIRFLOW__COMFY__*`` settings inherited from the caller's
shell so that the provider's documented defaults apply.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="airflow-comfy-tests-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
AIRFLOW_BIN = str(Path(sys.executable).with_name("airflow"))


def _airflow_env(home: Path, dags_folder: Path | None = None, **comfy: str) -> dict[str, str]:
    """Environment for an Airflow rooted at ``home``; ``comfy`` sets ``[comfy]`` options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__COMFY__")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or home / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
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
