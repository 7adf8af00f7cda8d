"""The runner's cold path: what a group process imports before its first node starts.

A group process pays ``import torch`` before anything else; the libraries behind the model classes (diffusers,
transformers, and torch._dynamo and scipy, which they pull in) belong inside the loader nodes that need them.
The runner runs under ``python -X importtime`` with its stderr merged into its log, so the import lines and the
``node X (Class): start`` lines come in the order they happened (the log handler flushes every record).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from airflow_comfy.local_run import compile_for_run, run_workflow

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("diffusers", "transformers", "torch._dynamo", "scipy")
IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$")
NODE_START = re.compile(r"INFO node \S+ \(([^)]+)\): start$")

WRAPPER = """#!{python}
import subprocess, sys
with open({log!r}, "ab") as log:
    done = subprocess.run([{python!r}, "-X", "importtime", *sys.argv[1:]], stdout=log, stderr=subprocess.STDOUT)
sys.exit(done.returncode)
"""


def _imports_around_first_node(log: str) -> tuple[str, set[str], set[str]]:
    """(class of the first node, modules imported before it started, modules imported after)."""
    first, before, after = "", set(), set()
    for line in log.splitlines():
        if not first and (m := NODE_START.search(line)):
            first = m.group(1)
        elif m := IMPORT.match(line):
            (after if first else before).add(m.group(1))
    return first, before, after


def test_no_model_library_is_imported_before_the_first_node(demo_models, demo_inputs, tmp_path):
    log = tmp_path / "runner.log"
    wrapper = tmp_path / "python-importtime"
    wrapper.write_text(WRAPPER.format(python=sys.executable, log=str(log)), encoding="utf-8")
    wrapper.chmod(0o755)
    compiled = compile_for_run(ROOT / "example_workflows" / "txt2img_api.json", single_group=True)
    run_workflow(compiled, models=demo_models, input_dir=demo_inputs, store=(tmp_path / "store").as_uri(),
                 python=str(wrapper), echo=lambda _msg: None)
    first, before, after = _imports_around_first_node(log.read_text(encoding="utf-8", errors="replace"))
    assert first == "CheckpointLoaderSimple"
    assert "torch" in before and "airflow_comfy.runner.executor" in before
    assert [name for name in HEAVY if name in before] == []
    # ... and the loader node does import them: the split above is real.
    assert {"diffusers", "transformers", "torch._dynamo"} <= after
