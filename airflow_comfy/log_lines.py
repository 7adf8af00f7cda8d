"""The runner's log line format, shared by the runner (which writes it) and the operators (which read it).

Every line the runner logs starts with its level: ``WARNING node 6 (VAEDecode): out of memory ...``. A record
of several lines (a traceback) repeats the level on each line, so that a line read alone still has its level.
There is no timestamp: whoever collects the output adds one (Airflow's task log, ``kubectl logs
--timestamps``), and a second one in the task log only makes the lines longer.

Why the level leads the line: the operators relay each runner line into the task log at its own level (see
:func:`parse_line`), and KubernetesPodOperator (cncf.kubernetes 10.x) reads a leading ``LEVEL`` from a
container's log line in the same way, so a pod's WARNING and ERROR lines keep their level too.

The failure line (:mod:`airflow_comfy.runner.failure`, ``airflow-comfy runner: bad input: ...``) is written
with ``ERROR`` before it. Pure: no torch, no Airflow.
"""

from __future__ import annotations

import logging
import re

LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
          "CRITICAL": logging.CRITICAL}
_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$", re.DOTALL)


class RunnerLogFormatter(logging.Formatter):
    """``LEVEL message``, the level repeated on every line of a record of several lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return "\n".join(f"{record.levelname} {line}" for line in text.split("\n"))


def level_line(level: str, text: str) -> str:
    """``text`` as the runner writes it at ``level`` (every line prefixed)."""
    return "\n".join(f"{level} {line}" for line in text.split("\n"))


def parse_line(line: str) -> tuple[int, str]:
    """The level and the message of one line of the runner's output. A line that is not the runner's (a
    library printing to stdout) is INFO, as it is."""
    match = _LINE.match(line)
    if match is None:
        return logging.INFO, line
    return LEVELS[match.group(1)], match.group(2)
