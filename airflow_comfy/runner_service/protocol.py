"""The wire format between a task and a runner service: length-prefixed JSON frames on a Unix socket.

Each frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON (an object). The task's request may
carry file descriptors (``SCM_RIGHTS``): the device lock it holds, so that the service holds the device while
the job runs, as a runner subprocess does by inheriting the lock.

Task -> service::

    {"op": "run", "version": 1, "argv": [...], "env": {...}, "cwd": "..."}   # + the lock's descriptor
    {"op": "run", ..., "env": {...}, "env_base": "service"}  # a task elsewhere: env adds to the service's own
    {"op": "cancel"}                 # or closing the connection: either cancels the job
    {"op": "ping"} / {"op": "stop"}  # a status frame; stop also ends the service

Service -> task::

    {"type": "started", "pid": 123, "job": 7}        # the job runs (else: {"type": "refused", "reason": ...})
    {"type": "log", "lines": ["...", ...]}           # the runner's stdout and stderr, as they come
    {"type": "exit", "code": 0, "cancelled": false, "cache": {...}, "seconds": 1.2}

Standard library only: both sides use it, and the task side never imports torch (nor the runner Airflow).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

VERSION = 1
#: ``env_base`` of a run request from a task in another container: the job's environment is the service's own
#: plus the request's ``env`` (whose process variables must equal the service's), in the service's own folder.
ENV_BASE_SERVICE = "service"
MAX_FRAME = 64 * 2**20
MAX_FDS = 4
_HEADER = struct.Struct(">I")


class ProtocolError(ConnectionError):
    """A frame that is not what the protocol says (too large, not a JSON object)."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes is over the limit of {MAX_FRAME}")
    return _HEADER.pack(len(data)) + data


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = encode(message)
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


class FrameReader:
    """Reads whole frames from a stream socket, keeping what it has read of the next one. Descriptors that
    come with the bytes are collected in :attr:`fds` (close-on-exec), for the caller to take."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.fds: list[int] = []

    def read(self) -> dict[str, Any] | None:
        """The next frame; None when the peer closed the connection between frames. A connection that ends
        inside a frame is a :class:`ConnectionError`."""
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            chunk = self._recv()
            if not chunk:
                if self.buffer:
                    raise ConnectionError("the connection ended in the middle of a frame")
                return None
            self.buffer += chunk

    def _recv(self) -> bytes:
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, MAX_FDS,
                                                   getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        self.fds.extend(fds)
        return data

    def _take(self) -> dict[str, Any] | None:
        if len(self.buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self.buffer)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes announced, over the limit of {MAX_FRAME}")
        if len(self.buffer) < _HEADER.size + length:
            return None
        data = bytes(self.buffer[_HEADER.size:_HEADER.size + length])
        del self.buffer[:_HEADER.size + length]
        try:
            message = json.loads(data.decode("utf-8"))
        except ValueError as exc:
            raise ProtocolError(f"a frame is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("a frame is not a JSON object")
        return message


# --- which environment variables a process reads once --------------------------------------------------------------

#: Variables read when a library loads or a device first starts (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS,
#: PYTORCH_CUDA_ALLOC_CONF, PYTHONPATH, HF_HUB_OFFLINE ...): a job runs in a service only when its values of
#: these are the service's own. The other variables are set per job (the AWS credentials, COMFY_RUNNER_*).
PROCESS_ENV_PREFIXES = (
    "CUDA_", "CUBLAS_", "CUDNN_", "NCCL_", "NVIDIA_", "PYTORCH_", "TORCH", "OMP_", "KMP_", "MKL_", "OPENBLAS_",
    "GOMP_", "LD_", "PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TOKENIZERS_",
)
#: Variables a service also starts with, so that it finds its interpreter's tools and writes where a task would.
BASIC_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV")


def is_process_env(name: str) -> bool:
    return name.startswith(PROCESS_ENV_PREFIXES)


def process_env(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that a process reads once (see :data:`PROCESS_ENV_PREFIXES`)."""
    return {name: value for name, value in sorted(env.items()) if is_process_env(name)}
