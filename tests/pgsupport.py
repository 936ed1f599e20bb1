"""
A throwaway PostgreSQL cluster for the tests, and a fresh database per test.

One cluster per test process: ``initdb`` into a temporary directory, started
with ``pg_ctl`` listening on a Unix socket in that directory only (no TCP
port to collide with anything), stopped when the process exits. Each test
gets a database of its own (``fresh_database``), dropped after it, so tests
never see each other's rows.

``initdb`` refuses to run as root: as root the server binaries run as the
``postgres`` user (``runuser -u postgres --``) in a directory that user
owns. The binaries are taken from ``PATH`` or from Debian's
``/usr/lib/postgresql/<version>/bin``. When none is found the tests that
need PostgreSQL fail (never skip): ``.ci/run`` installs Debian's
``postgresql`` package, and a developer can do the same.

``fsync`` is off (the tests never crash the OS, and an fsync per commit
would make the suite slow on a shared machine); ``synchronous_commit``
stays on, so a killed or restarted server keeps every acknowledged commit.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any, List, Optional

from twisted.trial.unittest import TestCase

BIN_NAMES = ("initdb", "pg_ctl", "postgres")


class PostgresUnavailable(AssertionError):
    """No PostgreSQL server binaries here: a test that needs them fails."""


def find_bindir() -> str:
    """The directory holding initdb, pg_ctl and postgres."""
    candidates: List[str] = []
    env = os.environ.get("HOOKAH_TEST_PG_BINDIR")
    if env:
        candidates.append(env)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))

    def version(path: str) -> float:
        try:
            return float(path.split("/")[-2])
        except ValueError:
            return 0.0

    candidates.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True))
    for directory in candidates:
        if all(os.access(os.path.join(directory, name), os.X_OK) for name in BIN_NAMES):
            return directory
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in"
        " /usr/lib/postgresql/*/bin: install Debian's postgresql package"
        " (.ci/run does), or set HOOKAH_TEST_PG_BINDIR"
    )


class Cluster:
    """One PostgreSQL server in a temporary directory, on a Unix socket."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        self.directory = tempfile.mkdtemp(prefix="hookah-pg-")
        self.data = os.path.join(self.directory, "data")
        self.socket_dir = self.directory
        self.log_path = os.path.join(self.directory, "server.log")
        self.port = 5432
        self.user = "postgres" if self.as_root else (os.environ.get("USER") or "postgres")
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        if self.as_root:
            # The server runs as postgres: it must own its directory.
            shutil.chown(self.directory, "postgres", "postgres")
            os.chmod(self.directory, 0o755)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, cwd=self.directory, check=check, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def init(self) -> None:
        result = self._run(
            "initdb", "-D", self.data, "-U", self.user, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync", check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {result.stdout}")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(
                "\nlisten_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"port = {self.port}\n"
                "fsync = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 32MB\n"
            )

    def start(self) -> None:
        result = self._run(
            "pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "60", "start",
            check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl start failed: {result.stdout}\n{self.server_log()}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def server_log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str) -> str:
        """A libpq URL of ``database`` on this cluster's socket."""
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"

    def admin(self, sql: str, database: str = "postgres") -> List[Any]:
        """Run one statement on a blocking connection (autocommit); its rows."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def create_database(self) -> str:
        with self._lock:
            name = f"hookah_{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a test's store may still be closing its connections.
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_cluster: Optional[Cluster] = None
_cluster_lock = threading.Lock()


def cluster() -> Cluster:
    """The process's cluster, started on first use and removed at exit."""
    global _cluster
    with _cluster_lock:
        if _cluster is None:
            started = Cluster()
            try:
                started.init()
                started.start()
            except BaseException:
                shutil.rmtree(started.directory, ignore_errors=True)
                raise
            atexit.register(started.remove)
            _cluster = started
        return _cluster


def fresh_database(case: TestCase) -> str:
    """The URL of a new, empty database, dropped when ``case`` ends."""
    pg = cluster()
    name = pg.create_database()
    case.addCleanup(pg.drop_database, name)
    return pg.url(name)
