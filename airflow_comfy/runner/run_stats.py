"""What one group run cost, node by node: the figures the task log shows and the manifest's ``stats`` carry, and
from which the operators emit the group's metrics (:mod:`airflow_comfy.metrics`).

Per node: its seconds, split into model load (a loader node: ``CheckpointLoaderSimple``, ``VAELoader``,
``LoraLoader``, ...; the catalog's ``loaders`` category) or compute (any other node), and the bytes it read
(upstream groups' values, from the artifact store) and wrote (values handed to later groups, and images).
Group totals: model load, sampling (KSampler nodes), decode (VAEDecode nodes) and all compute seconds, the
bytes handed off in and out, image bytes, and the process's peak resident memory (and peak CUDA memory
allocated by torch when the group ran on CUDA) during the group.

Why by node role and not inside the model code: a loader node is where a model file is read, so its time is
the load time; a ControlNet that a sampler rebuilds from an upstream recipe counts as sampling.

Peak RSS is the kernel's high-water mark (``VmHWM``), reset at the group's start where Linux allows it
(``/proc/self/clear_refs``), so that a warm runner service reports each job's own peak rather than its
lifetime's; where it cannot be reset it is the process's peak so far.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

from airflow_comfy.workflow.catalog import Catalog

LOAD, SAMPLING, DECODE, COMPUTE = "load", "sampling", "decode", "compute"
#: Node types that run the diffusion model, beside the catalog's ``sampling`` category.
SAMPLING_TYPES = frozenset({"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"})


def node_role(class_type: str, catalog: Catalog | None = None) -> str:
    """``load``, ``sampling``, ``decode`` or ``compute``: which total a node's seconds go to."""
    catalog = catalog or Catalog.builtin()
    category = catalog.get(class_type).category if class_type in catalog else ""
    if category == "loaders":
        return LOAD
    if class_type in SAMPLING_TYPES or category == "sampling":
        return SAMPLING
    if class_type.startswith("VAEDecode"):
        return DECODE
    return COMPUTE


@dataclass
class NodeFigures:
    class_type: str
    role: str
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0

    def to_dict(self) -> dict[str, Any]:
        load = self.seconds if self.role == LOAD else 0.0
        return {"class_type": self.class_type, "role": self.role, "seconds": round(self.seconds, 4),
                "load_s": round(load, 4), "compute_s": round(self.seconds - load, 4),
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written}


class GroupStats:
    """Collects one group run's figures; :meth:`to_dict` is the manifest's ``stats``."""

    def __init__(self, device: Any = None) -> None:
        self.nodes: dict[str, NodeFigures] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.image_bytes = 0
        self._cuda = device if getattr(device, "type", None) == "cuda" else None
        reset_peak_rss()
        if self._cuda is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(self._cuda)

    def node(self, node_id: str, class_type: str) -> NodeFigures:
        if node_id not in self.nodes:
            self.nodes[node_id] = NodeFigures(class_type, node_role(class_type))
        return self.nodes[node_id]

    def read(self, node_id: str, class_type: str, nbytes: int) -> None:
        """``node_id`` read ``nbytes`` of upstream groups' values."""
        self.node(node_id, class_type).bytes_read += nbytes
        self.bytes_in += nbytes

    def handed_off(self, node_id: str, class_type: str, nbytes: int) -> None:
        """A value of ``node_id`` (``nbytes``) was written for later groups."""
        self.node(node_id, class_type).bytes_written += nbytes
        self.bytes_out += nbytes

    def image(self, node_id: str, class_type: str, nbytes: int) -> None:
        self.node(node_id, class_type).bytes_written += nbytes
        self.image_bytes += nbytes

    def totals(self) -> dict[str, Any]:
        def seconds(*roles: str) -> float:
            return round(sum(f.seconds for f in self.nodes.values() if f.role in roles), 4)

        totals: dict[str, Any] = {
            "model_load_s": seconds(LOAD), "sampling_s": seconds(SAMPLING), "decode_s": seconds(DECODE),
            "compute_s": seconds(SAMPLING, DECODE, COMPUTE), "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "image_bytes": self.image_bytes, "peak_rss_bytes": peak_rss_bytes(),
        }
        if self._cuda is not None:
            import torch

            totals["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(self._cuda))
        return totals

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": {node_id: f.to_dict() for node_id, f in self.nodes.items()}, "totals": self.totals()}


def log_lines(stats: dict[str, Any]) -> list[str]:
    """The task log's lines for ``stats`` (a manifest's): one per node, then the group's totals."""
    lines = []
    for node_id, f in stats.get("nodes", {}).items():
        lines.append(f"node {node_id} ({f['class_type']}): model load {f['load_s']:.2f} s, compute "
                     f"{f['compute_s']:.2f} s, read {human_bytes(f['bytes_read'])}, wrote "
                     f"{human_bytes(f['bytes_written'])}")
    t = stats.get("totals", {})
    cuda = f", peak CUDA {t['peak_cuda_bytes'] / 2**20:.1f} MiB" if "peak_cuda_bytes" in t else ""
    lines.append(f"group totals: model load {t['model_load_s']:.2f} s, sampling {t['sampling_s']:.2f} s, decode "
                 f"{t['decode_s']:.2f} s, compute {t['compute_s']:.2f} s; handed off in "
                 f"{human_bytes(t['bytes_in'])}, out {human_bytes(t['bytes_out'])}, images "
                 f"{human_bytes(t['image_bytes'])}; peak RSS {t['peak_rss_bytes'] / 2**20:.1f} MiB{cuda}")
    return lines


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``5`` to ``/proc/self/clear_refs``); best effort."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory since :func:`reset_peak_rss` (or since it started)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
