"""The result of a ``dag.test()`` run in a subprocess (the DAG file prints ``RESULT <json>`` last), shared by
the tests that run their DAG that way while other tests go on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def dag_test_result(proc: subprocess.Popen, home: Path, timeout: float) -> dict[str, Any]:
    """Wait for ``proc`` (killed after ``timeout`` seconds) and return its last ``RESULT`` JSON, with its whole
    output (``home / "output.log"``) under ``"output"``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = (home / "output.log").read_text(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"dag.test() printed no result (exit code {proc.returncode}):\n{output[-8000:]}"
    return {**json.loads(lines[-1][len("RESULT "):]), "output": output}
