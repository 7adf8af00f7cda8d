"""The fault suite's table of cases and outcomes (``tests/test_faults.py`` fills it; ``conftest.py`` prints it at
the end of the run, in ``pytest -q`` output too)."""

from __future__ import annotations

ROWS: list[tuple[str, str, str, float]] = []
"""(case, fault, outcome, seconds)."""


def record(case: str, fault: str, outcome: str, seconds: float) -> None:
    ROWS.append((case, fault, outcome, seconds))


def lines() -> list[str]:
    if not ROWS:
        return []
    widths = [max(len(str(row[i])) for row in [("case", "fault", "outcome", "")] + ROWS) for i in range(3)]
    head = f"{'case':<{widths[0]}}  {'fault':<{widths[1]}}  {'outcome':<{widths[2]}}  seconds"
    body = [f"{c:<{widths[0]}}  {f:<{widths[1]}}  {o:<{widths[2]}}  {s:7.1f}" for c, f, o, s in ROWS]
    return [head, "-" * len(head), *body]
