"""A throw-away PostgreSQL server for tests (and benchmarks) that run Airflow's real scheduler.

SQLite serialises every writer, so a scheduler, a dag-processor, an api-server and LocalExecutor workers
cannot share it; PostgreSQL can. Nothing runs beforehand: :class:`PostgresServer` creates a cluster in a
scratch folder, starts it on a free loopback port and removes it again. The server binaries come from
Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``); when they are missing,
:func:`find_postgres_bin` fails with the command that installs them. PostgreSQL refuses to run as root: as
root the cluster belongs to the ``postgres`` account the package creates (or to one created here).

Usage (plain Python, no pytest needed, so benchmarks can use it too)::

    with PostgresServer() as pg:
        url = pg.create_database("airflow")          # postgresql+psycopg2://airflow@127.0.0.1:PORT/airflow

:func:`migrated_airflow_database` migrates one database with ``airflow db migrate`` and clones it (``CREATE
DATABASE ... TEMPLATE``, well under a second) for every further test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

APT_INSTALL = "apt-get install -y postgresql"
#: The OS account that owns the cluster when the tests run as root.
ROOT_FALLBACK_ACCOUNTS = ("postgres", "airflow-comfy-pg")
#: The database superuser (trust authentication on 127.0.0.1 only).
DB_USER = "airflow"
#: Durability is worthless in a throw-away cluster; these make Airflow's many small commits cheap.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "listen_addresses": "127.0.0.1",
}


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_postgres_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$POSTGRES_BIN``, else the newest Debian
    ``/usr/lib/postgresql/<version>/bin``, else wherever ``initdb`` is on the PATH."""
    candidates = []
    if os.environ.get("POSTGRES_BIN"):
        candidates.append(Path(os.environ["POSTGRES_BIN"]))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version_key(p.parent.name),
                    reverse=True)
    candidates += debian
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresUnavailable(
        "The PostgreSQL server binaries (initdb, pg_ctl) are not installed; the scheduler tests start their own "
        f"server. Install them with:  {APT_INSTALL}  (as root; `make test` does it when run as root), or set "
        "POSTGRES_BIN to a folder that has them.")


def _version_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in name.split("."))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_account() -> str | None:
    """Who runs the server: None (this process's user) unless we are root; then an unprivileged account,
    created when none of :data:`ROOT_FALLBACK_ACCOUNTS` exists."""
    if os.geteuid() != 0:
        return None
    for name in ROOT_FALLBACK_ACCOUNTS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    name = ROOT_FALLBACK_ACCOUNTS[-1]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    return name


class PostgresServer:
    """One PostgreSQL cluster in a scratch folder, on a free port of 127.0.0.1 (see the module docstring).

    ``start()``/``stop()`` or a ``with`` block; ``url(db)`` is the SQLAlchemy URL Airflow takes.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.bin = find_postgres_bin()
        self.account = _cluster_account()
        # The server's account must reach the folder: a fresh folder under the system temp dir (pytest's own
        # temp folders are private to this user).
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="airflow-comfy-pg-"))
        self._own_root = root is None
        self.data = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.port: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, attempts: int = 3) -> PostgresServer:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.account:
            shutil.chown(self.root, user=self.account)
        self._as_account([self.bin / "initdb", "-D", self.data, "-U", DB_USER, "-A", "trust", "-E", "UTF8",
                          "--no-locale", "--no-sync"])
        last_error = ""
        for _ in range(attempts):  # another process may take the free port first
            self.port = free_port()
            options = " ".join(f"-c {k}={v}" for k, v in {**FAST_SETTINGS, "port": self.port}.items())
            options += f" -c unix_socket_directories={self.root}"
            proc = self._as_account([self.bin / "pg_ctl", "-D", self.data, "-l", self.log_file, "-o", options,
                                     "-w", "-t", "60", "start"], check=False)
            if proc.returncode == 0:
                return self
            last_error = proc.stdout + proc.stderr + self.log_tail()
        raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")

    def stop(self) -> None:
        if self.data.exists() and (self.data / "postmaster.pid").exists():
            self._as_account([self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop"],
                             check=False)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # --- databases ---------------------------------------------------------------------------------------------

    def url(self, database: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run one statement (autocommit, so CREATE DATABASE works); returns its rows, if any."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=DB_USER, dbname=database)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (a copy of ``template`` when given); returns its URL."""
        clause = f' TEMPLATE "{template}"' if template else ""
        self.execute(f'CREATE DATABASE "{name}"{clause}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # --- helpers -----------------------------------------------------------------------------------------------

    def _as_account(self, command: list, check: bool = True) -> subprocess.CompletedProcess:
        args = [str(part) for part in command]
        if self.account:
            args = ["runuser", "-u", self.account, "--", *args]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=self.root, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


def migrated_airflow_database(server: PostgresServer, name: str, env: dict[str, str], *,
                              template: str = "airflow_template", airflow_bin: str = "airflow",
                              timeout: float = 300) -> str:
    """A database ``name`` with Airflow's schema: the first call migrates ``template`` with ``airflow db
    migrate`` (``env``: the Airflow environment, whose database URL is replaced), later ones clone it."""
    exists = server.execute(f"SELECT 1 FROM pg_database WHERE datname = '{template}'")
    if not exists:
        server.create_database(template)
        migrate_env = {**env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": server.url(template)}
        started = time.monotonic()
        proc = subprocess.run([airflow_bin, "db", "migrate"], env=migrate_env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            server.drop_database(template)
            raise RuntimeError(f"airflow db migrate failed after {time.monotonic() - started:.0f} s:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return server.create_database(name, template=template)
