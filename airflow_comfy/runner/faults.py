"""A test seam for crash tests: ``AIRFLOW_COMFY_RUNNER_CRASH_AT=<point>`` makes the runner kill itself with
SIGKILL at that point, as the kernel's OOM killer, a node failure or ``kill -9`` would, with no chance to clean
up. The fault tests (``tests/test_faults.py``) kill real runner processes this way, then retry them.

Points: ``start`` (preflight done, nothing computed), ``intermediate`` (the group's boundary values written),
``image`` (its images published under their final names, no manifest yet), ``manifest`` (the manifest written,
nothing cleaned yet). Unset (always, outside those tests): nothing happens.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "AIRFLOW_COMFY_RUNNER_CRASH_AT"
POINTS = ("start", "intermediate", "image", "manifest")


def crash_point(name: str) -> None:
    """SIGKILL this process if :data:`ENV` names ``name``."""
    if os.environ.get(ENV) != name:
        return
    print(f"airflow-comfy runner: crash point {name!r}: SIGKILL", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
