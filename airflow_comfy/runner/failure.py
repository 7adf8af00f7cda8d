"""How the runner says it failed: one line, last on stderr, that the operators put first in the task's error.

``airflow-comfy runner: bad input: <sentence>`` (exit 2) or ``airflow-comfy runner: failed: <sentence>``
(exit 1), written as an ``ERROR`` line (:mod:`airflow_comfy.log_lines`), so that it reaches the task log
at that level. The sentence names what failed (node id and class type, input, or URI) and why; a traceback, when
there is one, goes to the log before it, once. In a Kubernetes pod the line is also the container's
termination message (``/dev/termination-log``, or ``COMFY_TERMINATION_LOG``), which KubernetesPodOperator
reports when the pod fails.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from contextlib import suppress

from airflow_comfy.log_lines import level_line

PREFIX = "airflow-comfy runner: "
BAD_INPUT = "bad input"
FAILED = "failed"
TERMINATION_LOG_ENV = "COMFY_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MAX_CHARS = 2000


def one_line(text: str) -> str:
    """``text`` on one line (whitespace runs collapsed), at most :data:`MAX_CHARS` characters."""
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= MAX_CHARS else line[:MAX_CHARS - 3] + "..."


def describe(exc: BaseException, current_node: str | None = None, *, with_type: bool = True) -> str:
    """``<Type>: <message>`` (just the message when ``with_type`` is false: errors whose message says it all, such
    as the artifact store's, which name the URI), preceded by ``node <id> (<class>): `` when a node was running
    and the message does not already start with a node."""
    text = f"{type(exc).__name__}: {exc}" if with_type else str(exc)
    if current_node and not str(exc).startswith("node "):
        text = f"{current_node}: {text}"
    return one_line(text)


def report(kind: str, sentence: str) -> None:
    """Print the failure line (last on stderr) and leave it as the termination message, if there is a place
    for one."""
    line = f"{PREFIX}{kind}: {one_line(sentence)}"
    sys.stdout.flush()
    print(level_line("ERROR", line), file=sys.stderr, flush=True)
    path = os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG
    if os.path.exists(path) or TERMINATION_LOG_ENV in os.environ:
        with suppress(OSError), open(path, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")


def print_traceback() -> None:
    """The exception being handled, as ERROR lines on stderr (each line carries the level)."""
    sys.stdout.flush()
    print(level_line("ERROR", traceback.format_exc().rstrip("\n")), file=sys.stderr, flush=True)
