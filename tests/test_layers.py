"""Imports point one way: the runner never imports Airflow (it runs in a pod image without it)."""

from __future__ import annotations

import subprocess
import sys

RUNNER_MODULES = [
    "airflow_comfy.runner.cli", "airflow_comfy.runner.executor", "airflow_comfy.runner.registry",
    "airflow_comfy.runner.codecs", "airflow_comfy.runner.text", "airflow_comfy.runner.models",
    "airflow_comfy.runner.sampling.ksampler", "airflow_comfy.runner.ops.save", "airflow_comfy.artifacts.store",
]


def test_runner_imports_no_airflow():
    code = (
        "import sys\n"
        f"for name in {RUNNER_MODULES!r}: __import__(name)\n"
        "from airflow_comfy.runner.registry import implemented_types\n"
        "assert len(implemented_types()) == 34\n"
        "leaked = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(leaked)\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
