"""Per-step progress lines for long sampler runs: ``"<label>: step n/N, elapsed 3.2s, ETA 12.9s"``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from airflow_comfy.runner import cancel

logger = logging.getLogger("airflow_comfy.runner.sampling")


def _fmt(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


class StepProgress:
    """``progress(step, total)`` -> writes one line through ``write`` (default: this package's logger at INFO).

    The clock starts at construction (or at the first :meth:`reset`); the ETA assumes the remaining steps take
    as long as the mean step so far. ``every`` writes only every n-th step (the last one is always written).
    Each call first checks whether the runner service cancelled the job (:func:`airflow_comfy.runner.cancel.check`),
    so that a cancelled job stops after the step that is running.
    """

    def __init__(self, label: str = "sampling", write: Callable[[str], None] | None = None, *, every: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.write = write or logger.info
        self.every = max(1, int(every))
        self.clock = clock
        self.start = clock()
        self.lines: list[str] = []

    def reset(self) -> None:
        self.start = self.clock()

    def line(self, step: int, total: int) -> str:
        elapsed = max(0.0, self.clock() - self.start)
        eta = elapsed / step * (total - step) if step > 0 else 0.0
        return f"{self.label}: step {step}/{total}, elapsed {_fmt(elapsed)}, ETA {_fmt(eta)}"

    def __call__(self, step: int, total: int) -> None:
        cancel.check()
        if step % self.every and step != total:
            return
        text = self.line(step, total)
        self.lines.append(text)
        self.write(text)
