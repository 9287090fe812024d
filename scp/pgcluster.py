"""A throwaway PostgreSQL server: its own cluster in a temporary folder, on a free loopback port.

Why: the tests and the benchmarks run the node against a real PostgreSQL server,
and must not depend on one being configured on the machine (or touch one that
is).  ``initdb`` and ``pg_ctl`` from Debian's ``postgresql`` package (or any on
the PATH) create a cluster that trusts local connections, listens on 127.0.0.1
only, and is stopped and deleted afterwards.  PostgreSQL refuses to run as
root, so as root the cluster belongs to the ``postgres`` user.

``NNCODEC_TEST_POSTGRES_URL`` (a database that may be emptied) replaces the
throwaway cluster where one cannot be started.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

ENV_URL = "NNCODEC_TEST_POSTGRES_URL"


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here (the reason says why)."""


def binaries() -> str | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest Debian version first), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))
    for folder in candidates:
        if all(os.access(os.path.join(folder, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return folder
    return None


def _version(folder: str) -> float:
    try:
        return float(folder.split("/")[-2])
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """``Cluster().start()`` ... ``.stop()`` (or ``with Cluster() as pg``); :meth:`new_database` gives a URL.

    ``fsync`` off by default: a test cluster is thrown away, and fsync would only slow the tests;
    benchmarks turn it on to measure what a real server does."""

    def __init__(self, fsync: bool = False, max_connections: int = 300):
        self.fsync, self.max_connections = fsync, max_connections
        self.folder: str | None = None
        self.port: int | None = None
        self._user: str | None = None

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        kwargs = {"user": self._user} if self._user else {}
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=self.folder, **kwargs)
        if r.returncode != 0:
            raise Unavailable(f"{os.path.basename(cmd[0])} failed ({r.returncode}): "
                              f"{(r.stderr or r.stdout).strip()[-1500:]}")

    def start(self) -> "Cluster":
        folder = binaries()
        if folder is None:
            raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed "
                              "(Debian: apt-get install postgresql)")
        if os.geteuid() == 0:
            import pwd
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root, and there is no postgres user to run the server as") from None
            self._user = "postgres"
        self.folder = tempfile.mkdtemp(prefix="nncodec-pg-")
        if self._user:
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        data = os.path.join(self.folder, "data")
        try:
            self._run(os.path.join(folder, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
            self.port = _free_port()
            options = (f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections={self.max_connections} "
                       f"-c fsync={'on' if self.fsync else 'off'} -c synchronous_commit={'on' if self.fsync else 'off'}"
                       f" -c full_page_writes={'on' if self.fsync else 'off'}")
            self._run(os.path.join(folder, "pg_ctl"), "-D", data, "-o", options, "-l",
                      os.path.join(self.folder, "server.log"), "-w", "-t", "60", "start")
        except BaseException:
            self._remove()
            raise
        self._pg_ctl = os.path.join(folder, "pg_ctl")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "nncodec") -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away) and remove the folder."""
        if self.folder and self.port is not None:
            try:
                self._run(self._pg_ctl, "-D", os.path.join(self.folder, "data"), "-m", "immediate", "-w", "stop",
                          timeout=60)
            except (Unavailable, subprocess.TimeoutExpired):
                pass
        self._remove()

    def _remove(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self.port = None, None

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def empty(url: str) -> str:
    """Drop the node's tables in the database ``url`` (one given by NNCODEC_TEST_POSTGRES_URL); ``url``."""
    from .index import Base, Index
    idx = Index(url)
    try:
        Base.metadata.drop_all(idx.engine)
    finally:
        idx.dispose()
    return url


def for_bench(choice: str):
    """What a benchmark's ``--index`` names: "sqlite" (the node's default: ""), "postgresql" (a throwaway
    cluster with fsync on, as a real server runs) or an SQLAlchemy URL.  A context manager giving
    (index URL, label for the report)."""
    import contextlib

    @contextlib.contextmanager
    def run():
        if choice in ("", "sqlite"):
            yield "", "SQLite"
        elif choice in ("postgresql", "postgres"):
            with Cluster(fsync=True) as pg:
                yield pg.new_database("bench"), f"PostgreSQL (throwaway server {_server_version()}, fsync on)"
        else:
            yield choice, choice.split(":", 1)[0]
    return run()


def _server_version() -> str:
    folder = binaries()
    if folder is None:
        return "?"
    out = subprocess.run([os.path.join(folder, "pg_ctl"), "--version"], capture_output=True, text=True)
    import re
    found = re.search(r"\d+(\.\d+)+", out.stdout) if out.returncode == 0 else None
    return found.group(0) if found else "?"
