"""Imports point one way: the runner never imports Airflow (it runs in a pod image without it)."""

from __future__ import annotations

import subprocess
import sys

RUNNER_MODULES = [
    "airflow_comfy.runner.cli", "airflow_comfy.runner.executor", "airflow_comfy.runner.registry",
    "airflow_comfy.runner.codecs", "airflow_comfy.runner.text", "airflow_comfy.runner.models",
    "airflow_comfy.runner.sampling.ksampler", "airflow_comfy.runner.ops.save", "airflow_comfy.artifacts.store",
    "airflow_comfy.runner.service",
]


def test_runner_imports_no_airflow():
    code = (
        "import sys\n"
        f"for name in {RUNNER_MODULES!r}: __import__(name)\n"
        "from airflow_comfy.runner.registry import implemented_types\n"
        "assert len(implemented_types()) == 34\n"
        "leaked = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(leaked)\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_device_and_precision_selection():
    """CUDA when present, CPU otherwise; fp16 UNet/CLIP on CUDA by default, fp32 on the CPU; asking for CUDA
    where there is none is an infrastructure error (retryable on another node), not bad input."""
    import pytest
    import torch

    from airflow_comfy.runner.cli import _device, _dtype

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert _device("auto").type == expected
    assert _dtype("auto", torch.device("cuda")) == torch.float16
    assert _dtype("auto", torch.device("cpu")) == torch.float32
    assert _dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            _device("cuda")
