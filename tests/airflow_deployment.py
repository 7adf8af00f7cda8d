"""A small real Airflow deployment for tests and benchmarks: scheduler (LocalExecutor), dag-processor and
api-server, each its own process, on a PostgreSQL metadata database (:mod:`postgres`).

Never ``airflow standalone``: each service is started as a deployment starts it and stopped by its process id
(SIGTERM, then SIGKILL of the process group it leads after a grace period). Tasks of the LocalExecutor talk to
the execution API (Airflow 3), hence the api-server (one worker; by default with the public REST API too,
:meth:`AirflowDeployment.rest`, open to anyone: ``simple_auth_manager_all_admins``; a deployment whose ``env``
turns that off and configures users calls :meth:`AirflowDeployment.log_in` first).

Usage::

    deployment = AirflowDeployment(home, db_url, dags_folder, env={...})
    with deployment:                                  # starts the three services, stops them on exit
        deployment.wait_for_dags({"my_dag"})
        deployment.python("from airflow...; print(...)")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from postgres import free_port

AIRFLOW_BIN = str(Path(sys.executable).with_name("airflow"))
#: What a script run with :meth:`AirflowDeployment.python` prints before its JSON result.
RESULT_MARK = "RESULT "


class AirflowDeployment:
    """See the module docstring. ``env`` adds to (and wins over) the deployment's own environment; the
    process environment it starts from is this process's, minus ``AIRFLOW__*`` and ``AIRFLOW_HOME``."""

    def __init__(self, home: Path, sql_alchemy_conn: str, dags_folder: Path, env: dict[str, str] | None = None,
                 parallelism: int = 4, api_apps: str = "all") -> None:
        self.home = Path(home)
        self.api_apps = api_apps
        self.logs = self.home / "service-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__") and k != "AIRFLOW_HOME"}
        self.env = {
            **base,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn,
            # every service must sign and accept the same task tokens
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
            "AIRFLOW__API__SECRET_KEY": os.urandom(16).hex(),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **(env or {}),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        #: Sent as a bearer token by :meth:`rest` once :meth:`log_in` got one (a deployment with a real login).
        self.api_token: str | None = None

    # --- services ----------------------------------------------------------------------------------------------

    def start(self) -> AirflowDeployment:
        self._spawn("api-server", ["api-server", "--apps", self.api_apps, "-w", "1", "-H", "127.0.0.1",
                                   "-p", str(self.api_port)])
        self._spawn("dag-processor", ["dag-processor"])
        self._spawn("scheduler", ["scheduler", "--skip-serve-logs"])
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it until it exits
        try:
            # its own session: the process leads a group holding its workers, stopped together in stop()
            self.processes[name] = subprocess.Popen([AIRFLOW_BIN, *args], env=self.env, stdout=log,
                                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                    start_new_session=True, cwd=self.home)
        finally:
            log.close()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the scheduler by its pid and wait for it (it lets its running tasks finish, and they need the
        api-server for that), then the dag-processor and the api-server; SIGKILL whatever is left of each
        one's process group after ``grace`` seconds per step."""
        for names in (("scheduler",), ("dag-processor", "api-server")):
            step = [self.processes[name] for name in names if name in self.processes]
            for proc in step:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in step:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this service leads (its own pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> AirflowDeployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise AssertionError(f"airflow {name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {name} ---\n{self.log_tail(name, chars)}" for name in sorted(self.processes))

    # --- talking to it -----------------------------------------------------------------------------------------

    def airflow(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([AIRFLOW_BIN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"airflow {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def python(self, script: str, *args: str, timeout: float = 180) -> Any:
        """Run ``script`` in a fresh interpreter of this deployment (Airflow imported as in any of its
        processes); returns the JSON it prints after :data:`RESULT_MARK`, if any."""
        proc = subprocess.run([sys.executable, "-c", script, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
        return None

    def rest(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One call of the public REST API (``/api/v2/...``): (status, JSON body)."""
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_token:
            headers["Authorization"] = f"Bearer {self.api_token}"
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def log_in(self, username: str, password: str) -> None:
        """Get a token from the simple auth manager (``POST /auth/token``) for the next :meth:`rest` calls: for a
        deployment started with ``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False`` and real users."""
        self.api_token = None
        status, answer = self.rest("POST", "/auth/token", {"username": username, "password": password})
        assert status == 201, f"logging in as {username!r}: {status} {answer}"
        self.api_token = answer["access_token"]

    @property
    def url(self) -> str:
        """The api-server's address: the UI, the REST API and the plugins' apps."""
        return f"http://127.0.0.1:{self.api_port}"

    def wait_for_api(self, timeout: float = 120) -> None:
        def up() -> bool:
            try:
                return self.rest("GET", "/api/v2/monitor/health")[0] == 200
            except OSError:
                return False

        self.wait_for("the api-server", up, timeout)

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        """Poll ``probe`` until it returns something truthy; fails with the services' logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs_tail()}")
            time.sleep(interval)

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 120) -> None:
        """Until the dag-processor has serialized every DAG of ``dag_ids`` (and none is an import error)."""
        wanted = sorted(dag_ids)
        sql = ("SELECT dag_id FROM serialized_dag WHERE dag_id IN ("
               + ", ".join(f"'{dag_id}'" for dag_id in wanted) + ")")
        self.wait_for(f"the dag-processor to serialize {wanted}",
                      lambda: len(self.sql(sql)) == len(wanted), timeout, interval=1.0)

    def sql(self, query: str) -> list[tuple]:
        """Rows of one query on the metadata database (psycopg2, outside Airflow: cheap to poll)."""
        import psycopg2
        from sqlalchemy.engine import make_url

        url = make_url(self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, dbname=url.database)
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()
