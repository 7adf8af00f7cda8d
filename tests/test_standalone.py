"""The repository stands on its own: nothing in it reads from, or points at, a folder beside the checkout, every
file the tests read is in ``tests/data`` with its provenance, and the README's settings are the real ones."""

from __future__ import annotations

import re
from pathlib import Path

from workflow_builders import DATA, REPO

from airflow_comfy.provider_info import CONFIG_OPTIONS

SCANNED = ["airflow_comfy", "tests", "benchmarks", "dags", "scripts", ".ci", "README.md", "Makefile",
           "pyproject.toml"]

# Built from pieces so that this file does not match itself.
OUTSIDE_PATHS = ["../" + "shared", "shared" + "/reference", "parents[" + "2]", "REPO" + ".parent"]


def _text_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        assert path.exists(), f"{name} is missing from the repository"
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in candidates if "__pycache__" not in p.parts and p.suffix not in {".pyc", ".png"}]
    return files


def test_nothing_points_outside_the_repository():
    found = []
    for path in _text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in OUTSIDE_PATHS):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_every_test_data_file_has_its_provenance():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    files = sorted(p.name for p in DATA.iterdir() if p.is_file() and p.name != "README.md")
    assert "object_info-comfyui-0.3.64.json" in files
    missing = [name for name in files if f"## `{name}`" not in readme]
    assert not missing, f"tests/data/README.md does not describe: {missing}"


def test_readme_lists_every_setting():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("its settings live in the `[comfy]` section")
    paragraph = readme[start:readme.index("\n\n", start)]
    named = set(re.findall(r"`([a-z_]+)`", paragraph)) - {"local", "kubernetes"}  # the backend's values
    assert named == set(CONFIG_OPTIONS)
