"""Without Chromium the UI tests fail, saying how to install it, and start no deployment: CI must not go green by
skipping them (tests/test_ui_browser.py, tests/browser.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from browser import APT_INSTALL

TESTS = Path(__file__).resolve().parent


def test_the_ui_tests_fail_saying_how_to_install_chromium_when_it_is_missing(tmp_path: Path):
    # a PATH with this interpreter's folder and an empty one: no chromium on it, and no CHROMIUM set
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CHROMIUM"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(empty)])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(TESTS / "test_ui_browser.py")], env=env, cwd=TESTS.parent, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output  # 1: tests failed (5 would be "no tests ran", 0 all passed or skipped)
    assert APT_INSTALL in output, output
    assert "skipped" not in output.splitlines()[-1], output
    assert "deployment ready" not in output, output
