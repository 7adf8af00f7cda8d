"""The task's side of a runner service: find it, start it on demand, send it a job, stream the job's log, cancel.

A service is named by its slot and a fingerprint. The slot is a device lock's (``gpu-0.slot0``: a group that
holds GPU 0's first slot uses that device's service) or, for a group without a managed GPU, one of
``cpu_slots`` CPU slots. The fingerprint hashes what a process reads once: the interpreter, the package's
folder and the process environment (:data:`~airflow_comfy.runner_service.protocol.PROCESS_ENV_PREFIXES`,
``CUDA_VISIBLE_DEVICES`` among them), so a job only ever runs in a service started the way its own runner
subprocess would start. The socket is ``<runtime dir>/<slot>-<fingerprint>.sock``; beside it ``.busy`` (a
``flock`` held by the one task using the service, which is also the only one that may start it: no two tasks
start the same service) and ``.log`` (the service's own output between jobs).

A service that runs elsewhere (``ServiceConfig.socket``: another container that shares the socket's folder, the
models and the store) is only connected to, never started: the task waits for its turn on the ``.busy`` lock
beside that socket, and its job runs in the service's own environment plus the job's variables (the request's
``env_base: service``; the service's folders, interpreter and process variables are its own).

:class:`ServiceUnavailable` means the job did not start (no usable runtime folder, all CPU slots busy, the
service would not start, refused the job or went away before starting it): the caller runs a subprocess
instead, or, with a service that runs elsewhere, fails the try. :class:`ServiceDied` means it started and the
service ended without an exit status (killed, crashed, out of memory): an infrastructure failure of this try.

Standard library only: the task side never imports torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_comfy.runner_service import protocol

RUNNER_MODULE = "airflow_comfy.runner"
#: Seconds a service may take to start (imports torch, diffusers, the runner) before the task gives up on it.
START_TIMEOUT = 120.0
#: Seconds the service has to answer a job request.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds the task waits, beyond the service's own cancel grace, before it kills a service that keeps running a
#: cancelled job.
KILL_MARGIN = 3.0
#: Longest socket path Linux accepts (sun_path is 108 bytes, with the final NUL).
MAX_SOCKET_PATH = 107
#: A service log over this many bytes is started afresh.
MAX_LOG_BYTES = 10 * 2**20
#: Seconds between two tries for the busy lock of a service that runs elsewhere while another task uses it.
TURN_POLL = 0.25


class ServiceUnavailable(Exception):
    """The job did not start in a service: run it as a subprocess."""


class ServiceDied(Exception):
    """The service ended during the job without an exit status (killed, crashed, out of memory)."""


@dataclass(frozen=True)
class ServiceConfig:
    """How the task finds and starts services (the ``[comfy] runner_service_*`` settings)."""

    python: str
    directory: str = ""
    """Runtime folder of the sockets; empty: :func:`default_runtime_dir`."""
    idle_timeout: float = 600.0
    cache_budget_mb: float = 8192.0
    cancel_grace: float = 5.0
    cpu_slots: int = 1
    start_timeout: float = START_TIMEOUT
    socket: str = ""
    """The socket of a service that runs elsewhere (connect only: never started here); empty: services are
    started on demand in :attr:`directory`."""

    @property
    def external(self) -> bool:
        return bool(self.socket.strip())


@dataclass
class JobResult:
    code: int
    cancelled: bool
    pid: int
    job: int
    seconds: float
    cache: dict[str, Any] = field(default_factory=dict)
    started_service: bool = False

    def describe(self) -> str:
        """One line for the task log: where the job ran and what the model cache did."""
        hits, misses = int(self.cache.get("hits", 0)), int(self.cache.get("misses", 0))
        if hits or misses:
            models = f"model cache: {hits} hit(s), {misses} load(s) from disk"
        else:
            models = "no model loaded"
        fresh = "a service started for it" if self.started_service else "already warm"
        return (f"ran in the warm runner service (pid {self.pid}, its job {self.job}; {fresh}) in "
                f"{self.seconds:.2f} s; {models}; cache {int(self.cache.get('entries', 0))} model(s), "
                f"{int(self.cache.get('bytes', 0)) / 2**20:.0f} MiB")


# --- names and folders -------------------------------------------------------------------------------------------


def default_runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/airflow-comfy`` when that folder exists, else ``<tmp>/airflow-comfy-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "airflow-comfy"
    return Path(tempfile.gettempdir()) / f"airflow-comfy-{os.getuid()}"


def runtime_dir(setting: str) -> Path:
    """The runtime folder, created (mode 0700) if needed. It must be this user's own and closed to others (the
    sockets run jobs as this user): anything else is :class:`ServiceUnavailable`."""
    path = Path(setting).expanduser() if setting.strip() else default_runtime_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ServiceUnavailable(f"cannot use the runtime folder {path}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ServiceUnavailable(f"the runtime folder {path} is not a folder")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ServiceUnavailable(f"the runtime folder {path} must belong to this user (uid {os.getuid()}) and be "
                                 f"closed to others (mode 0700), not uid {st.st_uid} mode {oct(st.st_mode & 0o777)}")
    return path


def fingerprint(python: str, env: Mapping[str, str]) -> str:
    """What makes two runner processes interchangeable: interpreter, package folder, process environment."""
    package = Path(__file__).resolve().parents[1]  # the airflow_comfy package
    data = {"python": python, "package": str(package), "protocol": protocol.VERSION,
            "env": protocol.process_env(dict(env))}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def slot_name(device: str, slot: int) -> str:
    """The service slot of a device lock's slot."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in device)
    if len(safe) > 40:
        safe = hashlib.sha256(device.encode("utf-8")).hexdigest()[:16]
    return f"gpu-{safe}.slot{slot}"


def service_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment a service starts with: the job's process variables (see :func:`fingerprint`) and the
    basic ones (PATH, HOME, locale ...); never the job's own variables (its credentials come with each job)."""
    return {name: value for name, value in env.items()
            if protocol.is_process_env(name) or name in protocol.BASIC_ENV or name.startswith("LC_")}


def serve_command(config: ServiceConfig, socket_path: Path) -> list[str]:
    return [config.python, "-m", RUNNER_MODULE, "serve", "--socket", str(socket_path),
            "--cache-budget-mb", f"{config.cache_budget_mb:g}", "--idle-timeout", f"{config.idle_timeout:g}",
            "--cancel-grace", f"{config.cancel_grace:g}"]


# --- one job ------------------------------------------------------------------------------------------------------


class ServiceSession:
    """One task's use of one service: :meth:`open` claims a slot and connects (starting the service when none
    answers), :meth:`run` runs the job, :meth:`cancel` (any thread, or a signal handler) asks it to stop,
    :meth:`stop` waits until it has, :meth:`close` lets the slot go. A context manager."""

    def __init__(self, config: ServiceConfig, env: Mapping[str, str], *, slot: str | None = None,
                 log: Callable[[str], None] = lambda _message: None,
                 should_stop: Callable[[], bool] = lambda: False):
        self.config, self.env, self.slot, self.log = config, dict(env), slot, log
        self.should_stop = should_stop
        self.socket_path: Path | None = None
        self.pid: int | None = None
        self.started_service = False
        self.finished = False
        self._busy: int | None = None
        self._sock: socket.socket | None = None
        self._reader: protocol.FrameReader | None = None
        self._send_lock = threading.Lock()
        self._cancel_sent = False
        self._on_lines: Callable[[list[str]], None] = lambda _lines: None

    def __enter__(self) -> ServiceSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- claim and connect --

    def open(self) -> ServiceSession:
        if self.config.external:
            return self._open_external(Path(self.config.socket))
        directory = runtime_dir(self.config.directory)
        stem = f"-{fingerprint(self.config.python, self.env)}"
        names = [self.slot] if self.slot else [f"cpu.{n}" for n in range(max(1, self.config.cpu_slots))]
        for name in names:
            path = directory / f"{name}{stem}.sock"
            if len(str(path)) > MAX_SOCKET_PATH:
                raise ServiceUnavailable(f"the socket path {path} is over {MAX_SOCKET_PATH} bytes: set a shorter "
                                         "[comfy] runner_service_dir")
            try:
                busy = _try_lock(path.with_suffix(".busy"))
            except OSError as exc:
                raise ServiceUnavailable(f"cannot lock {path.with_suffix('.busy')}: {exc}") from None
            if busy is not None:
                self._busy, self.socket_path = busy, path
                break
        else:
            if self.slot:
                raise ServiceUnavailable(f"the runner service of {self.slot} is busy with another task")
            raise ServiceUnavailable(f"all {len(names)} runner service slot(s) for this worker are busy "
                                     f"({', '.join(names)}; [comfy] runner_service_cpu_slots)")
        try:
            self._connect_or_start()
        except BaseException:
            self.close()
            raise
        return self

    def _open_external(self, path: Path) -> ServiceSession:
        """Wait for this task's turn at the service that runs elsewhere (its ``.busy`` lock), then connect."""
        self.socket_path = path
        self._busy = self._wait_for_turn(path.with_suffix(".busy"))
        try:
            self._attach(self._connect_external())
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_turn(self, busy_path: Path) -> int:
        waiting = False
        while True:
            try:
                busy = _try_lock(busy_path)
            except OSError as exc:
                raise ServiceUnavailable(f"cannot lock {busy_path}: {exc}") from None
            if busy is not None:
                return busy
            if self.should_stop():
                raise ServiceUnavailable("the task was stopped while it waited for its turn at the runner service")
            if not waiting:
                self.log(f"waiting for the runner service at {self.config.socket}: it runs another task's job")
                waiting = True
            time.sleep(TURN_POLL)

    def _connect_external(self) -> socket.socket:
        assert self.socket_path is not None
        sock = _connect(self.socket_path)
        if sock is None:
            raise ServiceUnavailable(f"no runner service answers at {self.socket_path}")
        return sock

    def _connect_or_start(self) -> None:
        assert self.socket_path is not None
        sock = _connect(self.socket_path)
        if sock is None:
            sock = self._start()
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        self._sock, self._reader = sock, protocol.FrameReader(sock)

    def _start(self) -> socket.socket:
        assert self.socket_path is not None
        path = self.socket_path
        log_path = path.with_suffix(".log")
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > MAX_LOG_BYTES:
                log_path.unlink()
        command = serve_command(self.config, path)
        self.log(f"starting a runner service for {path.name} (log {log_path})")
        try:
            with open(log_path, "ab") as out:
                process = subprocess.Popen(command, env=service_env(self.env), stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                           cwd=str(path.parent))
        except OSError as exc:
            raise ServiceUnavailable(f"could not start the runner service {command[0]!r}: {exc}") from None
        deadline = time.monotonic() + self.config.start_timeout
        pause = 0.02
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                self.started_service = True
                return sock
            code = process.poll()
            if code is not None:
                raise ServiceUnavailable(f"the runner service exited with code {code} while starting "
                                         f"(see {log_path})")
            time.sleep(pause)
            pause = min(0.2, pause * 1.5)
        with contextlib.suppress(OSError):
            process.kill()
        raise ServiceUnavailable(f"the runner service did not answer within {self.config.start_timeout:g} s "
                                 f"(see {log_path})")

    # -- the job --

    def run(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: str | None = None,
            fds: Sequence[int] = (), on_lines: Callable[[list[str]], None] = lambda _lines: None,
            on_started: Callable[[], None] = lambda: None) -> JobResult:
        """Run ``argv`` (the runner's arguments, ``run ...``) with ``env`` and ``cwd``; ``fds`` (the device lock)
        are held by the service while the job runs. ``on_started()`` is called once the service runs the job,
        and the log lines go to ``on_lines`` as they come."""
        self._on_lines = on_lines
        request: dict[str, Any] = {"op": "run", "version": protocol.VERSION, "argv": list(argv), "env": dict(env)}
        if self.config.external:  # its folders are not ours: it runs in its own environment and folder
            request["env_base"] = protocol.ENV_BASE_SERVICE
        else:
            request["cwd"] = cwd or os.getcwd()
        first = self._request(request, fds)
        if first is None and not self.started_service:
            # The service may have been ending (idle) as we connected: one fresh try.
            self.log("the runner service closed the connection before the job started; "
                     + ("connecting again" if self.config.external else "starting a fresh one"))
            self._drop_connection()
            self._attach(self._connect_external() if self.config.external else self._start())
            first = self._request(request, fds)
        if first is None:
            raise ServiceUnavailable("the runner service closed the connection before the job started")
        if first.get("type") == "refused":
            raise ServiceUnavailable(f"the runner service refused the job: {first.get('reason')}")
        if first.get("type") != "started":
            raise ServiceUnavailable(f"unexpected answer from the runner service: {str(first)[:200]}")
        self.pid = int(first["pid"])
        assert self._sock is not None
        self._sock.settimeout(None)
        on_started()
        return self._follow(int(first.get("job", 0)))

    def _request(self, request: dict[str, Any], fds: Sequence[int]) -> dict[str, Any] | None:
        assert self._sock is not None and self._reader is not None
        try:
            with self._send_lock:
                protocol.send(self._sock, request, tuple(fds))
            return self._reader.read()
        except TimeoutError:
            raise ServiceUnavailable(f"the runner service did not answer within {HANDSHAKE_TIMEOUT:g} s") from None
        except (OSError, protocol.ProtocolError):
            return None

    def _follow(self, job: int) -> JobResult:
        """Log frames until the exit frame."""
        while True:
            frame = self._next_frame()
            if frame.get("type") == "exit":
                self.finished = True
                return JobResult(code=int(frame.get("code", 1)), cancelled=bool(frame.get("cancelled")),
                                 pid=int(frame.get("pid", self.pid or 0)), job=int(frame.get("job", job)),
                                 seconds=float(frame.get("seconds", 0.0)), cache=dict(frame.get("cache") or {}),
                                 started_service=self.started_service)

    def _next_frame(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            frame = self._reader.read()
        except (ConnectionError, protocol.ProtocolError) as exc:
            frame, error = None, f": {exc}"
        else:
            error = ""
        if frame is None:
            self.finished = True
            raise ServiceDied(f"the runner service (pid {self.pid}) ended during the job without an exit status"
                              f"{error} ({self._why_gone()}); see {self._log_path()}")
        if frame.get("type") == "log":
            self._on_lines([str(line) for line in frame.get("lines") or []])
        return frame

    def _why_gone(self) -> str:
        if self.config.external:
            return "it runs elsewhere: its own log says why"
        if self.pid is None:
            return "pid unknown"
        if not _alive(self.pid):
            return "it is gone: killed, crashed or out of memory"
        return "its process is still there"

    def _log_path(self) -> str:
        if self.config.external:
            return "the output of the process that serves it (in the docker-compose stack: docker compose logs runner)"
        return str(self.socket_path.with_suffix(".log")) if self.socket_path else "its log"

    # -- cancel --

    def cancel(self) -> None:
        """Ask the service to stop the job (never blocks for long: callable from a signal handler)."""
        sock = self._sock
        if sock is None or self.finished or self._cancel_sent:
            return
        if not self._send_lock.acquire(timeout=1.0):
            return
        try:
            self._cancel_sent = True
            with contextlib.suppress(OSError):
                sock.sendall(protocol.encode({"op": "cancel"}))
        finally:
            self._send_lock.release()

    def stop(self) -> None:
        """Cancel the job (if it has not ended) and wait until it has: its exit frame, or the connection's end.
        A service that keeps running the job past its grace period (plus a margin) is killed."""
        if self._sock is None or self.finished or self.pid is None:
            return
        self.cancel()
        if self._drain(self.config.cancel_grace + KILL_MARGIN):
            return
        if self.config.external:  # its pid is another machine's or container's: it ends itself after its grace
            self.log(f"the runner service at {self.socket_path} did not stop the job: leaving it (it exits "
                     "when its own cancel grace has passed)")
            return
        self.log(f"the runner service (pid {self.pid}) did not stop the job: killing it")
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self._drain(10.0)

    def _drain(self, seconds: float) -> bool:
        """Read frames (logging their lines) until the job ends; whether it did within ``seconds``."""
        assert self._sock is not None
        deadline = time.monotonic() + seconds
        try:
            while not self.finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._sock.settimeout(remaining)
                if self._next_frame().get("type") == "exit":
                    self.finished = True
        except TimeoutError:
            return False
        except (ServiceDied, OSError):
            self.finished = True
        return True

    # -- let go --

    def _drop_connection(self) -> None:
        sock, self._sock, self._reader = self._sock, None, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self._drop_connection()
        busy, self._busy = self._busy, None
        if busy is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(busy, fcntl.LOCK_UN)
            os.close(busy)


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _connect(path: Path) -> socket.socket | None:
    """A connection to the service at ``path``; None when nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise ServiceUnavailable(f"cannot connect to the runner service at {path}: {exc}") from None
    return sock


# --- status and stop (tests, benchmarks, operators of a worker) --------------------------------------------------


def request(path: str | os.PathLike[str], op: str = "ping", timeout: float = 10.0) -> dict[str, Any] | None:
    """``ping`` (the service's status: pid, jobs, cache) or ``stop`` (status, then the service exits) to the
    service at ``path``; None when none answers."""
    sock = _connect(Path(path))
    if sock is None:
        return None
    with sock:
        sock.settimeout(timeout)
        try:
            protocol.send(sock, {"op": op})
            return protocol.FrameReader(sock).read()
        except (OSError, protocol.ProtocolError):
            return None


def stop_all(directory: str | os.PathLike[str], timeout: float = 10.0) -> list[int]:
    """Stop every service with a socket in ``directory`` (waiting for each to exit); their pids."""
    stopped = []
    for path in sorted(Path(directory).glob("*.sock")):
        status = request(path, "stop", timeout=timeout)
        if status and "pid" in status:
            stopped.append(int(status["pid"]))
    deadline = time.monotonic() + timeout
    for pid in stopped:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
    return stopped


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, which its parent has not waited for yet, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
