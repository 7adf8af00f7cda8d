"""A real S3-protocol server for tests: moto's server mode over HTTP on 127.0.0.1 (in a thread, or in a process
of its own that a test can pause or kill)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """Start moto's threaded server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class MotoProcess:
    """moto's S3 server in a process of its own, so that a test can pause (SIGSTOP), resume or kill it."""

    def __init__(self, process: subprocess.Popen, endpoint: str) -> None:
        self.process, self.endpoint = process, endpoint

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def moto_s3_process(timeout: float = 60) -> Iterator[MotoProcess]:
    """Start ``python -m moto.server`` on a free loopback port and wait until it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = MotoProcess(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(server.endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start on port {port}") from None
                time.sleep(0.2)
        yield server
    finally:
        server.kill()
