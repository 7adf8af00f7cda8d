"""``python -m airflow_comfy.runner serve --socket PATH``: a long-lived runner that keeps its models loaded.

The service imports torch, diffusers and the runner once, then runs one job at a time: each job is the very
argument list of a runner subprocess (``run --spec ... --manifest-out ...``), run by the same ``main`` with the
same environment and working folder, and it writes the same outputs, bit for bit. Only the model caches
(:mod:`airflow_comfy.runner.models.cache`) outlive a job: bounded by ``--cache-budget-mb``, least recently used
first. Before and after each job the process state a job could change is put back as it was when the service
started (:class:`Baseline`): environment, working folder, torch's global RNG and numeric flags, the root
logger's handlers, the warning filters, the cancel flag.

The job's stdout and stderr (file descriptors 1 and 2, so C libraries' output too) go through a pipe to the
task, line by line, in log frames; the exit frame carries the runner's exit code. The task cancels by sending a
cancel frame or by closing the connection: the job stops at the next node or sampler step
(:mod:`airflow_comfy.runner.cancel`), and if it has not stopped ``--cancel-grace`` seconds later the service
exits at once (the task's next try starts a fresh one). The device lock the task sends with the job is held
until the job ends, as a runner subprocess holds the lock it inherits.

A task in another container (``[comfy] runner_service_socket``: its interpreter, folders and process variables
are not the service's) sends ``env_base: service``: its job runs in the service's own environment plus the
variables it sends (whose process variables must be the service's), in the service's own working folder.

The service ends after ``--idle-timeout`` seconds without a job, when its socket is removed or replaced, on a
stop frame, or when the runner's code changes (it refuses the job; the task starts a fresh service).
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_comfy.runner import cancel
from airflow_comfy.runner.failure import print_traceback
from airflow_comfy.runner_service import protocol
from airflow_comfy.workflow.groupspec import EXIT_INFRASTRUCTURE

log = logging.getLogger("airflow_comfy.runner.service")

#: Seconds a new connection has to send its request.
REQUEST_TIMEOUT = 10.0
#: Seconds between two looks at the socket file while no job comes.
IDLE_POLL = 10.0
#: Exit code of a job that was cancelled (as a subprocess stopped by SIGTERM would report it).
EXIT_CANCELLED = -signal.SIGTERM


def serve(socket_path: str, *, cache_budget_mb: float, idle_timeout: float, cancel_grace: float) -> int:
    from airflow_comfy.runner import cli
    from airflow_comfy.runner.models import cache

    start_env = dict(os.environ)
    cli.configure_process()
    _prewarm()
    cache.set_memory_budget(int(cache_budget_mb * 2**20))
    baseline = Baseline.capture()
    listener = _bind(socket_path)
    if listener is None:
        log.info("runner service: another service already answers on %s", socket_path)
        return 0
    service = Service(listener, socket_path, baseline, start_env, idle_timeout=idle_timeout,
                      cancel_grace=cancel_grace)
    log.info("runner service pid %d listening on %s (model cache budget %g MiB, idle timeout %g s)",
             os.getpid(), socket_path, cache_budget_mb, idle_timeout)
    try:
        service.loop()
    finally:
        service.close()
    return 0


def _prewarm() -> None:
    """Import what every job needs (torch, the runner and its nodes, diffusers, transformers) before the socket
    answers, so that a job never pays for it."""
    import torch  # noqa: F401

    import airflow_comfy.runner.executor  # noqa: F401
    from airflow_comfy.runner.registry import implementation

    implementation("CheckpointLoaderSimple")
    with contextlib.suppress(ImportError):
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401


def _bind(path: str) -> socket.socket | None:
    """The listening socket at ``path``; None when a live service already answers there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    else:
        return None
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(16)
    return listener


def code_stamp() -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of every module of the package this service runs: a change means new code."""
    root = Path(__file__).resolve().parents[1]  # the airflow_comfy package
    stamp = []
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            st = path.stat()
            stamp.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(stamp)


# --- the process state a job may change ------------------------------------------------------------------------


@dataclass
class Baseline:
    """What a fresh runner process has, as it was when the service started; :meth:`reset` puts it back."""

    env: dict[str, str]
    cwd: str
    seed: int
    grad: bool
    deterministic: bool
    deterministic_warn_only: bool
    default_dtype: Any
    matmul_precision: str
    cudnn: tuple[bool, bool, bool]
    threads: int
    handlers: list[logging.Handler]
    levels: dict[str, int]
    warning_filters: list[Any]

    @classmethod
    def capture(cls) -> Baseline:
        import torch

        return cls(env=dict(os.environ), cwd=os.getcwd(), seed=torch.initial_seed(), grad=torch.is_grad_enabled(),
                   deterministic=torch.are_deterministic_algorithms_enabled(),
                   deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                   default_dtype=torch.get_default_dtype(), matmul_precision=torch.get_float32_matmul_precision(),
                   cudnn=(torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                          torch.backends.cudnn.deterministic),
                   threads=torch.get_num_threads(), handlers=list(logging.root.handlers),
                   levels=_logger_levels(), warning_filters=list(warnings.filters))

    def reset(self) -> None:
        import torch

        cancel.clear()
        torch.manual_seed(self.seed)  # a fresh process's global generators (CPU and CUDA) start from this seed
        torch.set_grad_enabled(self.grad)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.set_default_dtype(self.default_dtype)
        torch.set_float32_matmul_precision(self.matmul_precision)
        (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = self.cudnn
        torch.set_num_threads(self.threads)
        logging.root.handlers[:] = self.handlers
        for name, level in self.levels.items():
            (logging.root if name == "" else logging.getLogger(name)).setLevel(level)
        warnings.filters[:] = self.warning_filters
        mutated = getattr(warnings, "_filters_mutated", None)
        if mutated is not None:  # forget which warnings were shown: a fresh process shows them again
            mutated()

    def enter(self, env: dict[str, str], cwd: str | None) -> None:
        """The job's environment and working folder."""
        self.reset()
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd or self.cwd)

    def leave(self) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        with contextlib.suppress(OSError):
            os.chdir(self.cwd)
        self.reset()


def _logger_levels() -> dict[str, int]:
    levels = {"": logging.root.level}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            levels[name] = logger.level
    return levels


# --- the job's output --------------------------------------------------------------------------------------------


class Output:
    """While active, file descriptors 1 and 2 write into a pipe whose lines ``send(lines)`` gets (as a runner
    subprocess's merged stdout and stderr would be read: UTF-8, undecodable bytes backslash-escaped, ``\\r\\n``
    and ``\\r`` as line ends)."""

    def __init__(self, send: Callable[[list[str]], None]):
        self.send = send
        self._saved: list[int] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Output:
        _flush()
        read_end, write_end = os.pipe()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="job-output", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        _flush()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        if self._thread is not None:
            self._thread.join()

    def _pump(self, read_end: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")
        pending = ""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                text = pending + decoder.decode(chunk)
                keep_cr = text.endswith("\r")  # perhaps the first half of \r\n
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                *lines, pending = text.split("\n")
                if keep_cr:
                    lines.append(pending)
                    pending = ""
                if lines:
                    self.send(lines)
        pending += decoder.decode(b"", final=True)
        if pending:
            self.send([pending])


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# --- one connection ----------------------------------------------------------------------------------------------


class Sender:
    """Frames to the task, from any thread; once the task is gone, frames are dropped."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.lock = threading.Lock()
        self.alive = True

    def send(self, message: dict[str, Any]) -> None:
        with self.lock:
            if not self.alive:
                return
            try:
                protocol.send(self.conn, message)
            except OSError:
                self.alive = False


class Watcher(threading.Thread):
    """Reads the connection while the job runs: a cancel frame or the task's hang-up cancels the job, and a job
    still running ``grace`` seconds later ends the service."""

    def __init__(self, reader: protocol.FrameReader, sender: Sender, grace: float, on_give_up: Callable[[], None]):
        super().__init__(name="job-watcher", daemon=True)
        self.reader, self.sender, self.grace, self.on_give_up = reader, sender, grace, on_give_up
        self.finished = threading.Event()

    def run(self) -> None:
        why = "the task closed the connection"
        try:
            while (frame := self.reader.read()) is not None:
                if frame.get("op") == "cancel":
                    why = "the task asked to cancel"
                    break
        except (OSError, protocol.ProtocolError):
            pass
        if self.finished.is_set():
            return
        cancel.request()
        log.warning("runner service: %s; the job stops at the next node or sampler step", why)
        if not self.finished.wait(self.grace):
            self.sender.send({"type": "log", "lines": [
                f"runner service: the cancelled job did not stop within {self.grace:g} s; the service (pid "
                f"{os.getpid()}) exits"]})
            self.on_give_up()


class Service:
    def __init__(self, listener: socket.socket, path: str, baseline: Baseline, start_env: dict[str, str], *,
                 idle_timeout: float, cancel_grace: float):
        self.listener, self.path, self.baseline = listener, path, baseline
        self.start_env = protocol.process_env(start_env)
        self.idle_timeout, self.cancel_grace = idle_timeout, cancel_grace
        self.inode = os.stat(path).st_ino
        self.code = code_stamp()
        self.jobs = 0
        self.state = threading.Lock()
        self.busy = False
        self.stopping = False
        self.closing = False
        self.last_job = time.monotonic()
        self.queue: queue.Queue[tuple[socket.socket, protocol.FrameReader, dict[str, Any]]] = queue.Queue()

    def loop(self) -> None:
        """Jobs run here, in the main thread, one at a time; a thread accepts connections (:meth:`_accept`)."""
        threading.Thread(target=self._accept, name="acceptor", daemon=True).start()
        while True:
            with self.state:
                idle = time.monotonic() - self.last_job
                why = None
                if not self.busy and idle >= self.idle_timeout:
                    why = f"no job for {idle:.0f} s"
                elif not self.busy and not self._socket_is_ours():
                    why = f"{self.path} was removed or replaced"
                elif not self.busy and self.stopping:
                    why = "asked to stop"
                if why is not None:
                    self.closing = True
                    log.info("runner service: %s: exiting", why)
                    return
            try:
                conn, reader, request = self.queue.get(timeout=max(0.1, min(IDLE_POLL, self.idle_timeout - idle)))
            except queue.Empty:
                continue
            released = False

            def release() -> None:
                """Take the next job from here on (the task may send it as soon as it has the exit frame)."""
                nonlocal released
                if not released:
                    released = True
                    with self.state:
                        self.busy = False
                        self.last_job = time.monotonic()

            try:
                with conn:
                    self._run(conn, reader, request, release)
            except OSError as exc:
                log.warning("runner service: the connection failed: %s", exc)
            finally:
                _close_fds(reader)
                release()

    def close(self) -> None:
        if self._socket_is_ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.listener.close()

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def _accept(self) -> None:
        """Answer pings and stops at once, hand a run request to the main thread when it is free, and refuse it
        when a job runs (one job at a time)."""
        self.listener.settimeout(1.0)
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            queued = False
            try:
                queued = self._answer(conn)
            except (OSError, protocol.ProtocolError) as exc:
                log.warning("runner service: a connection failed before its job: %s", exc)
            finally:
                if not queued:
                    conn.close()

    def _answer(self, conn: socket.socket) -> bool:
        """Read a connection's request and answer it; whether it went to the main thread as a job (with the
        descriptors that came with it: the others are closed here)."""
        conn.settimeout(REQUEST_TIMEOUT)
        reader = protocol.FrameReader(conn)
        queued = False
        try:
            request = reader.read()
            op = None if request is None else request.get("op")
            if op in ("ping", "stop"):
                with self.state:
                    self.stopping = self.stopping or op == "stop"
                protocol.send(conn, self.status())
            elif op != "run" or request is None:
                protocol.send(conn, {"type": "refused", "reason": f"unknown op {op!r}"})
            else:
                with self.state:
                    reason = ("the service is exiting" if self.closing or self.stopping
                              else "the service is busy with another job" if self.busy else None)
                    if reason is None:
                        self.busy = queued = True
                        self.queue.put((conn, reader, request))
                if not queued:
                    protocol.send(conn, {"type": "refused", "reason": reason})
        finally:
            if not queued:
                _close_fds(reader)
        return queued

    def status(self) -> dict[str, Any]:
        from airflow_comfy.runner.models import cache

        return {"type": "status", "pid": os.getpid(), "jobs": self.jobs, "cache": _cache_dict(cache.stats()),
                "python": sys.executable}

    def _refusal(self, request: dict[str, Any]) -> str | None:
        if request.get("version") != protocol.VERSION:
            return f"protocol version {request.get('version')!r}, the service speaks {protocol.VERSION}"
        if not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict):
            return "a run request needs argv (a list) and env (an object)"
        if request["argv"][:1] != ["run"]:
            return "a service runs 'run' jobs only"
        wanted = protocol.process_env(request["env"])
        if request.get("env_base") == protocol.ENV_BASE_SERVICE:  # only what the job sets must agree
            differ = sorted(k for k in wanted if wanted[k] != self.start_env.get(k))
        else:
            differ = sorted(k for k in set(wanted) | set(self.start_env) if wanted.get(k) != self.start_env.get(k))
        if differ:
            return f"the job's process environment differs from the service's ({', '.join(differ)})"
        if code_stamp() != self.code:
            self.stopping = True
            return "the runner's code changed since the service started"
        return None

    def _run(self, conn: socket.socket, reader: protocol.FrameReader, request: dict[str, Any],
             release: Callable[[], None]) -> None:
        from airflow_comfy.runner.models import cache

        locks, reader.fds = reader.fds, []
        try:
            reason = self._refusal(request)
            if reason is not None:
                log.info("runner service: job refused: %s", reason)
                protocol.send(conn, {"type": "refused", "reason": reason})
                return
            conn.settimeout(None)
            if _hung_up(conn):
                log.info("runner service: the task left before its job started")
                return
            self.jobs += 1
            sender = Sender(conn)
            sender.send({"type": "started", "pid": os.getpid(), "job": self.jobs})
            log.info("runner service: job %d starts (%d device lock(s) held)", self.jobs, len(locks))
            watcher = Watcher(reader, sender, self.cancel_grace, self._give_up)
            watcher.start()
            before, began = cache.stats(), time.monotonic()
            with Output(lambda lines: sender.send({"type": "log", "lines": lines})):
                code, cancelled = self._execute(request)
            _free_memory()
        finally:
            for fd in locks:  # the device is free once the job's memory is
                with contextlib.suppress(OSError):
                    os.close(fd)
        after = cache.stats()
        seconds = time.monotonic() - began
        cache_report = {**_cache_dict(after), "hits": after.hits - before.hits, "misses": after.misses - before.misses}
        watcher.finished.set()  # from here on, the task's hang-up is no cancel
        release()
        sender.send({"type": "exit", "code": code, "cancelled": cancelled, "seconds": round(seconds, 3),
                     "pid": os.getpid(), "job": self.jobs, "cache": cache_report})
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        watcher.join(timeout=5)
        log.info("runner service: job %d ended with exit code %s%s in %.2f s; model cache %d hit(s), %d miss(es), "
                 "%d entries, %.0f MiB", self.jobs, code, " (cancelled)" if cancelled else "", seconds,
                 cache_report["hits"], cache_report["misses"], after.entries, after.nbytes / 2**20)

    def _execute(self, request: dict[str, Any]) -> tuple[int, bool]:
        """Run the job as ``python -m airflow_comfy.runner <argv>`` would: its exit code, and whether it was
        cancelled."""
        from airflow_comfy.runner import cli

        code, cancelled = EXIT_INFRASTRUCTURE, False
        try:
            env = {str(k): str(v) for k, v in request["env"].items()}
            if request.get("env_base") == protocol.ENV_BASE_SERVICE:
                env = {**self.baseline.env, **env}
            self.baseline.enter(env, request.get("cwd"))
            code = cli.main([str(arg) for arg in request["argv"]])
        except cancel.JobCancelled:
            print("WARNING airflow-comfy runner: cancelled", file=sys.stderr, flush=True)
            code, cancelled = EXIT_CANCELLED, True
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # the job's failure must not end the service
            print_traceback()
            code = EXIT_INFRASTRUCTURE
        finally:
            cancelled = cancelled or cancel.requested()
            self.baseline.leave()
        return code, cancelled

    def _give_up(self) -> None:
        """The cancelled job does not stop: end the service now (its socket first, so that the next task starts
        a fresh one)."""
        log.error("runner service: the cancelled job did not stop within %g s: exiting", self.cancel_grace)
        if self._socket_is_ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        _flush()
        os._exit(EXIT_INFRASTRUCTURE)


def _exit_code(code: object) -> int:
    """``sys.exit(code)``'s process exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr, flush=True)
    return 1


def _hung_up(conn: socket.socket) -> bool:
    """Whether the task closed the connection already (it gave up waiting)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _close_fds(reader: protocol.FrameReader) -> None:
    fds, reader.fds = reader.fds, []
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _free_memory() -> None:
    """Give back what the job left (its tensors, reference cycles included) once it is gone; cached models stay.

    A full collection scans every object the service holds (torch, diffusers and the cached models: about half
    a million), which took 0.7-1 s per job on a busy 2-core machine. So what survives it is frozen (``gc.freeze``): the next job's
    collection scans only what that job made. The model caches unfreeze when they drop an entry
    (:func:`airflow_comfy.runner.models.cache.forget`), so an evicted model is collected at the next job's end."""
    gc.collect()
    gc.freeze()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _cache_dict(stats: Any) -> dict[str, Any]:
    return {"hits": stats.hits, "misses": stats.misses, "entries": stats.entries, "bytes": stats.nbytes,
            "budget": stats.budget}
