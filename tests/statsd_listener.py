"""A StatsD listener for tests: a UDP socket on a free loopback port, and a thread that keeps every line that
arrives (Airflow's StatsD client sends one metric per datagram; ``name:value|type``)."""

from __future__ import annotations

import socket
import threading


class StatsdListener:
    """A UDP socket on a free loopback port; a thread keeps every StatsD line that arrives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="statsd-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.extend(line for line in data.decode(errors="replace").splitlines() if line)

    def values(self, name: str) -> list[tuple[float, str]]:
        """(value, type) of every line of metric ``name`` (``name:value|type``)."""
        found = []
        for line in list(self.lines):
            metric, _, rest = line.partition(":")
            if metric == name:
                value, _, kind = rest.partition("|")
                found.append((float(value), kind))
        return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
