"""GPUs of a local worker: which devices the local backend hands out, which groups take one, and the
per-device lock files that keep two runners off the same card.

``[comfy] local_gpus`` names the devices: empty (no device management), ``auto`` (:func:`detect_gpus`: the
worker's ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``, else none) or a list such as ``0,1,3``
(indices, ``GPU-<uuid>`` or ``MIG-<uuid>``). Each device has ``[comfy] runners_per_gpu`` slots, and each
slot is a file in ``[comfy] device_lock_dir`` locked with ``flock``: whoever holds the lock holds the slot,
and the kernel drops the lock when the last process with the open file exits, so a killed task never keeps
a device.

Which groups take a device (:func:`group_needs_gpu`): the ones with a model node, i.e. a sampling group
(:func:`airflow_comfy.scheduling.pools.group_role`), a group that replays a loader recipe, or a group with a
node whose declaration has a model-like socket (MODEL, CLIP, VAE, CONTROL_NET, UPSCALE_MODEL: text encoding,
VAE encode/decode, ControlNet, model upscaling) or that the built-in catalog does not know. A group of image
and latent work alone (LoadImage, ImageScale, EmptyLatentImage, SaveImage...) takes none.

No Airflow and no torch: the operator and the tests use it, and so can any process that wants to hold a
device the way a task does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from airflow_comfy.scheduling.pools import SAMPLING, group_role
from airflow_comfy.workflow.catalog import SERIALIZABLE_TYPES, WIDGET_TYPES, Catalog
from airflow_comfy.workflow.groupspec import GroupSpec

AUTO = "auto"
#: A device as CUDA_VISIBLE_DEVICES names it: an index, a GPU UUID or a MIG device.
_DEVICE_RE = re.compile(r"^(\d+|(GPU|MIG)-[A-Za-z0-9][A-Za-z0-9_./-]*)$")
_SMI_GPU_RE = re.compile(r"^GPU (\d+):")
_SMI_MIG_RE = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)\s]+)\)")
#: Seconds ``nvidia-smi -L`` may take.
NVIDIA_SMI_TIMEOUT = 15.0
#: Bytes of a lock file read to name its holder.
_HOLDER_MAX = 512


# --- which groups take a device ----------------------------------------------------------------------------


def model_nodes(spec: GroupSpec, catalog: Catalog | None = None) -> list[str]:
    """The ids of the nodes of ``spec`` that load or run a model (see the module's docstring)."""
    catalog = catalog or Catalog.builtin()
    plain = SERIALIZABLE_TYPES | WIDGET_TYPES
    found = []
    for node_id, node in spec.nodes.items():
        declared = catalog.get(str(node.get("class_type")))
        if declared is None:  # not a node we know: it may well run a model
            found.append(node_id)
            continue
        types = {socket_.type for socket_ in declared.inputs} | {output.type for output in declared.outputs}
        if types - plain:
            found.append(node_id)
    return found


def group_needs_gpu(spec: GroupSpec, catalog: Catalog | None = None) -> bool:
    """Whether the group's runner takes a device when the worker's devices are managed: it samples, replays a
    loader recipe, or has a model node (:func:`model_nodes`)."""
    return group_role(spec.nodes) == SAMPLING or bool(spec.recipe_nodes) or bool(model_nodes(spec, catalog))


# --- which devices -----------------------------------------------------------------------------------------


def parse_gpu_list(text: str, setting: str = "[comfy] local_gpus") -> tuple[str, ...]:
    """An explicit device list, ``0,1,3`` (or GPU/MIG UUIDs). Empty entries are skipped; an entry that is not
    a device or a device named twice is a ``ValueError`` naming ``setting``."""
    devices: list[str] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if not _DEVICE_RE.match(entry):
            raise ValueError(f"{setting}: {entry!r} is not a device (an index such as 0, a GPU-<uuid> or a "
                             f"MIG-<uuid>); use a comma-separated list, 'auto' or nothing")
        device = str(int(entry)) if entry.isdigit() else entry
        if device in devices:
            raise ValueError(f"{setting}: device {device} is listed twice")
        devices.append(device)
    return tuple(devices)


def parse_cuda_visible_devices(value: str) -> tuple[str, ...]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value makes visible. Like CUDA, the list ends at the first entry
    that is not a device (``-1``, ``""``, ``NoDevFiles``...), so ``""`` and ``-1`` mean none."""
    devices: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not _DEVICE_RE.match(entry):
            break
        device = str(int(entry)) if entry.isdigit() else entry
        if device not in devices:
            devices.append(device)
    return tuple(devices)


def parse_nvidia_smi(text: str) -> tuple[str, ...]:
    """The devices of ``nvidia-smi -L``'s output: each GPU by index (``GPU 0: NVIDIA H100 ... (UUID: ...)``),
    except a GPU in MIG mode, which stands for its MIG devices (the indented ``MIG ... (UUID: MIG-...)``
    lines under it), each by UUID."""
    devices: list[str] = []
    current: str | None = None
    migs: list[str] = []

    def close() -> None:
        if current is not None:
            devices.extend(migs or [current])

    for line in text.splitlines():
        gpu = _SMI_GPU_RE.match(line)
        if gpu:
            close()
            current, migs = gpu.group(1), []
            continue
        mig = _SMI_MIG_RE.match(line)
        if mig and current is not None:
            migs.append(mig.group(1))
    close()
    return tuple(devices)


def detect_gpus(environ: Mapping[str, str] | None = None,
                nvidia_smi: Callable[[], str | None] | None = None) -> tuple[tuple[str, ...], str]:
    """The devices this worker sees, and where they came from: ``CUDA_VISIBLE_DEVICES`` when it is set (even
    to nothing), else ``nvidia-smi -L`` when that runs, else none. Never imports torch."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        value = environ["CUDA_VISIBLE_DEVICES"]
        return parse_cuda_visible_devices(value), f"CUDA_VISIBLE_DEVICES={value!r}"
    text = (nvidia_smi or run_nvidia_smi)()
    if text is None:
        return (), "no CUDA_VISIBLE_DEVICES and no working nvidia-smi"
    return parse_nvidia_smi(text), "nvidia-smi -L"


def run_nvidia_smi() -> str | None:
    """``nvidia-smi -L``'s output, or None when it is not on the PATH or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def resolve_gpus(setting: str, environ: Mapping[str, str] | None = None,
                 nvidia_smi: Callable[[], str | None] | None = None) -> tuple[tuple[str, ...], str]:
    """The devices ``[comfy] local_gpus`` names, and where they came from."""
    setting = setting.strip()
    if not setting:
        return (), "[comfy] local_gpus is empty"
    if setting.lower() == AUTO:
        return detect_gpus(environ, nvidia_smi)
    return parse_gpu_list(setting), "[comfy] local_gpus"


def check_local_gpus(setting: str) -> None:
    """Raise ``ValueError`` when ``[comfy] local_gpus`` is neither empty, ``auto`` nor a device list."""
    if setting.strip() and setting.strip().lower() != AUTO:
        parse_gpu_list(setting)


# --- the locks ---------------------------------------------------------------------------------------------


class DeviceWaitInterrupted(Exception):
    """The wait for a device was given up (the task is being killed)."""


@dataclass
class DeviceLease:
    """One slot of one device, held while the lock file's descriptor is open and locked."""

    device: str
    slot: int
    path: Path
    fd: int | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent). The holder's line is cleared first, while the lock is still ours."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def lock_file_name(device: str, slot: int) -> str:
    return f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.slot{slot}.lock"


def describe_holder(holder: str) -> str:
    """The line a lease writes into its lock file: who holds it, its process and host, since when."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since {stamp})"


class DeviceLocks:
    """The slots of ``devices`` (``runners_per_gpu`` each), as lock files in ``lock_dir``."""

    def __init__(self, devices: Iterable[str], runners_per_gpu: int, lock_dir: str | os.PathLike[str]):
        self.devices = tuple(devices)
        if not self.devices:
            raise ValueError("no devices to lock")
        if runners_per_gpu < 1:
            raise ValueError(f"[comfy] runners_per_gpu must be at least 1, not {runners_per_gpu}")
        self.runners_per_gpu = runners_per_gpu
        self.lock_dir = Path(lock_dir)

    @property
    def slots(self) -> list[tuple[str, int, Path]]:
        """Every slot, in the order they are tried: the first slot of each device, then the second..., so that
        runners spread over the devices before they share one."""
        return [(device, slot, self.lock_dir / lock_file_name(device, slot))
                for slot in range(self.runners_per_gpu) for device in self.devices]

    def try_acquire(self, holder: str) -> DeviceLease | None:
        """A free slot, locked and labelled with ``holder``; None when every slot is held."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        for device, slot, path in self.slots:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            lease = DeviceLease(device, slot, path, fd)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (describe_holder(holder) + "\n").encode("utf-8", "backslashreplace"), 0)
            except BaseException:
                lease.release()
                raise
            return lease
        return None

    def holders(self) -> list[str]:
        """Who holds each slot, as written in the lock files (``?`` for a slot whose file names nobody)."""
        names = []
        for device, slot, path in self.slots:
            try:
                with open(path, "rb") as f:
                    text = f.read(_HOLDER_MAX).decode("utf-8", "replace").strip()
            except OSError:
                text = ""
            where = device if self.runners_per_gpu == 1 else f"{device}#{slot}"
            names.append(f"GPU {where}: {text or '?'}")
        return names

    def acquire(self, holder: str, *, poll_seconds: float = 1.0, should_stop: Callable[[], bool] = lambda: False,
                log: Callable[..., None] | None = None) -> DeviceLease:
        """A slot: at once when one is free, else after waiting (polling every ``poll_seconds``; the wait is
        logged, and again whenever the holders change). Raises :class:`DeviceWaitInterrupted` as soon as
        ``should_stop()`` is true."""
        started = time.monotonic()
        logged: list[str] | None = None
        while True:
            if should_stop():
                raise DeviceWaitInterrupted("stopped while waiting for a GPU")
            lease = self.try_acquire(holder)
            if lease is not None:
                if logged is not None and log:
                    log("got GPU %s after waiting %.1f s", lease.device, time.monotonic() - started)
                return lease
            holders = self.holders()
            if holders != logged and log:
                log("waiting for a GPU (all %d held: by %s)", len(holders), "; ".join(holders))
            logged = holders
            time.sleep(poll_seconds)
