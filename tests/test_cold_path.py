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


PER_PROCESS_WRAPPER = """#!{python}
import os, subprocess, sys
with open(os.path.join({logs!r}, f"{{os.getpid()}}.log"), "ab") as log:
    done = subprocess.run([{python!r}, "-X", "importtime", *sys.argv[1:]], stdout=log, stderr=subprocess.STDOUT)
sys.exit(done.returncode)
"""


def _classes_and_imports(log: str) -> tuple[set[str], set[str]]:
    """(classes of the nodes the process ran, every module it imported)."""
    classes = {m.group(1) for line in log.splitlines() if (m := NODE_START.search(line))}
    return classes, {m.group(1) for line in log.splitlines() if (m := IMPORT.match(line))}


def test_a_vae_only_group_never_imports_diffusers_or_transformers(demo_models, demo_inputs, tmp_path):
    """txt2img as the factory slices it: the group that loads the checkpoint's VAE, decodes and saves the image
    builds our own autoencoder and imports no model library at all; the sampling group still does."""
    logs = tmp_path / "logs"
    logs.mkdir()
    wrapper = tmp_path / "python-importtime"
    wrapper.write_text(PER_PROCESS_WRAPPER.format(python=sys.executable, logs=str(logs)), encoding="utf-8")
    wrapper.chmod(0o755)
    compiled = compile_for_run(ROOT / "example_workflows" / "txt2img_api.json")
    run_workflow(compiled, models=demo_models, input_dir=demo_inputs, store=(tmp_path / "store").as_uri(),
                 python=str(wrapper), echo=lambda _msg: None)
    groups = [_classes_and_imports(p.read_text(encoding="utf-8", errors="replace")) for p in logs.glob("*.log")]
    decoding = [imports for classes, imports in groups if "VAEDecode" in classes]
    sampling = [imports for classes, imports in groups if "KSampler" in classes]
    assert len(decoding) == 1 and len(sampling) == 1 and len(groups) == 2
    assert {"CheckpointLoaderSimple", "VAEDecode", "SaveImage"} == next(c for c, _ in groups if "VAEDecode" in c)
    assert "airflow_comfy.runner.models.autoencoder" in decoding[0]
    assert [name for name in HEAVY if name in decoding[0]] == []
    assert {"diffusers", "transformers"} <= sampling[0]
