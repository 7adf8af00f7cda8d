"""Headless Chromium for the UI tests, driven by Playwright (tests/test_ui_browser.py).

The browser is Debian's ``chromium`` package, launched through Playwright's ``executable_path``: nothing here runs
``playwright install`` or downloads a browser. When it is missing, :func:`find_chromium` fails with the command
that installs it (``make test`` installs it when run as root, as it does PostgreSQL).

Screenshots: :class:`Screenshots` writes each step's picture to the test's own folder, and, when
``AIRFLOW_COMFY_SCREENSHOTS`` names a folder (``make screenshots`` sets it to ``docs/screenshots``), there too,
as a 256-colour PNG (the README shows those; a plain run of the tests leaves the committed ones alone).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

APT_INSTALL = "apt-get install -y chromium"
#: Where the README's screenshots come from when the tests are run to refresh them.
SCREENSHOTS_ENV = "AIRFLOW_COMFY_SCREENSHOTS"
#: The browser window: wide enough for Airflow's tables, small enough for small pictures.
VIEWPORT = {"width": 1280, "height": 800}


class ChromiumUnavailable(RuntimeError):
    """Neither ``$CHROMIUM`` nor a ``chromium`` on the PATH: the UI tests cannot run."""


def find_chromium() -> str:
    """The Chromium binary: ``$CHROMIUM`` when set (it must be one), else ``chromium`` (Debian's package) or
    ``chromium-browser`` on the PATH."""
    chosen = os.environ.get("CHROMIUM")
    if chosen:
        found = shutil.which(chosen)
        if not found:
            raise ChromiumUnavailable(f"CHROMIUM={chosen!r} is not an executable Chromium binary.")
        return found
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumUnavailable(
        "The UI tests drive Debian's Chromium (never a downloaded browser), and no `chromium` is on the PATH. "
        f"Install it with:  {APT_INSTALL}  (as root; `make test` does it when run as root), or set CHROMIUM "
        "to a Chromium binary.")


def launch_arguments() -> list[str]:
    """Chromium's sandbox needs user namespaces a root process in a container does not get."""
    return ["--no-sandbox"] if os.geteuid() == 0 else []


class Screenshots:
    """Pictures of the steps of one test module: ``shots.take(page, "02-dag-list")`` writes ``02-dag-list.png``
    into ``folder`` (and into ``$AIRFLOW_COMFY_SCREENSHOTS``, reduced, when set). The caller numbers the names,
    so that a picture keeps its name when only some of the tests run."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        published = os.environ.get(SCREENSHOTS_ENV)
        self.published = Path(published) if published else None

    def take(self, page, name: str, full_page: bool = False) -> Path:
        file_name = f"{name}.png"
        picture = page.screenshot(full_page=full_page)
        path = self.folder / file_name
        path.write_bytes(picture)
        if self.published is not None:
            self.published.mkdir(parents=True, exist_ok=True)
            (self.published / file_name).write_bytes(reduced_png(picture))
        return path


def reduced_png(picture: bytes) -> bytes:
    """The picture with a 256-colour palette: a UI screenshot keeps its look at a fraction of the bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(picture)) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out = io.BytesIO()
        palette.save(out, format="PNG", optimize=True)
        return out.getvalue()
