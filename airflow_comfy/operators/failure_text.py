"""The error a failed group task shows: its first line says what failed and why, in the runner's own words.

The runner ends a failure with one line, ``airflow-comfy runner: failed: <sentence>`` or ``... bad input:
<sentence>`` (:mod:`airflow_comfy.runner.failure`); the sentence names the node (id and class type), the
input or the object's URI. The task's error is that sentence, then one line saying how the runner ended and
whether Airflow retries it. The runner's output, tracebacks included, is in the task log once, above the error:
it is never repeated in the message. Pure functions: no Airflow.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

from airflow_comfy.workflow.groupspec import EXIT_BAD_INPUT

RUNNER_PREFIX = "airflow-comfy runner: "
_KINDS = ("failed: ", "bad input: ")


def runner_sentence(lines: Iterable[str]) -> str | None:
    """The sentence of the runner's last failure line among ``lines`` (None if there is none)."""
    found = None
    for line in lines:
        line = line.strip()
        at = line.find(RUNNER_PREFIX)
        if at < 0:
            continue
        rest = line[at + len(RUNNER_PREFIX):]
        for kind in _KINDS:
            if rest.startswith(kind):
                found = rest[len(kind):].strip()
    return found


def runner_failure(returncode: int, lines: Iterable[str], *, where: str = "") -> str:
    """The message of a task whose runner ended with ``returncode`` after printing ``lines`` (its last lines,
    or a pod's termination message). ``where``: e.g. ``"in pod x-1"``."""
    lines = list(lines)
    first = runner_sentence(lines) or _fallback(returncode, lines)
    place = f" {where}" if where else ""
    if returncode == EXIT_BAD_INPUT:
        second = f"The runner{place} refused its input (exit code {EXIT_BAD_INPUT}; not retried)."
    elif returncode < 0:
        second = (f"The runner{place} was killed ({_signal(-returncode)}, exit code {returncode}); retried if the "
                  "task has retries left.")
    else:
        killed = " (128 + 9: killed by SIGKILL, out of memory?)" if returncode == 137 else ""
        second = f"The runner{place} failed with exit code {returncode}{killed}; retried if the task has retries left."
    return f"{first}\n{second} Its output, and any traceback, are in the task log above."


def _fallback(returncode: int, lines: list[str]) -> str:
    if returncode < 0:
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the runner was killed by {_signal(-returncode)} before it could say why{hint}"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last or "the runner ended without a word"


def _signal(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
