"""The runner's output in the task log: each line at the level the runner gave it, without the level word.

The runner writes ``LEVEL message`` lines (:mod:`airflow_comfy.log_lines`). The local operator relays
each line of its runner subprocess, or of its job in the warm runner service, with :func:`relay_line`; for a
group pod, KubernetesPodOperator reads the leading level itself and calls :func:`pod_log_formatter` for the
text. A line that is not the runner's stays INFO, as it is. Airflow adds the timestamp.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from airflow_comfy.log_lines import parse_line

#: The logger method of each level the runner writes (Airflow's task logger is a structlog logger).
_METHODS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
            logging.CRITICAL: "critical"}


def relay_line(log: logging.Logger, line: str) -> None:
    """Log one line of the runner's output at its level."""
    level, message = parse_line(line)
    getattr(log, _METHODS[level])("%s", message)


def pod_log_formatter(container_name: str, message: str) -> str:
    """KubernetesPodOperator's ``log_formatter``: ``[container] message``, the level word gone (KPO has
    already read it from the line and logs the line at that level)."""
    return f"[{container_name}] {parse_line(message)[1]}"


def describe_run(command: Sequence[str], group: str) -> str:
    """What the ``Running:`` line says: the group, its spec's URI and sha256, then the command."""
    spec = _option(command, "--spec") or "?"
    sha256 = _option(command, "--spec-sha256") or "?"
    return f"group {group}: spec {spec} (sha256 {sha256}); command: {' '.join(_shorten(command))}"


def _option(command: Sequence[str], name: str) -> str | None:
    for index, argument in enumerate(command[:-1]):
        if argument == name:
            return command[index + 1]
    return None


def _shorten(command: Sequence[str], max_arg: int = 120) -> list[str]:
    """Long arguments (a data: URI spec, big params) shortened for the log."""
    return [arg if len(arg) <= max_arg else f"{arg[:max_arg]}...({len(arg)} chars)" for arg in command]
