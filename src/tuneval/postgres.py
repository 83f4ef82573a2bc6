"""A throwaway PostgreSQL cluster on loopback, for tests, benchmarks and trying the multi-machine
set-up on one machine (a real deployment points at its own database server).

``initdb`` + ``pg_ctl`` from the machine's PostgreSQL (Debian: /usr/lib/postgresql/<v>/bin),
listening on 127.0.0.1 only, trust authentication for one superuser, ``fsync`` off: about a
second to start. PostgreSQL refuses to run as root, so as root every command runs as the
``postgres`` system user (or ``nobody``) and the data folder is made theirs.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneval.errors import TunevalError
from tuneval.processes import alive

SUPERUSER = "tuneval"


def bin_dir() -> Path:
    """The folder holding initdb and pg_ctl (PATH first, then Debian's versioned folders, newest first)."""
    found = shutil.which("initdb")
    if found:  # often a symlink into the versioned folder, which also holds psql, createdb, ...
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if (Path(folder) / "initdb").exists():
            return Path(folder)
    raise TunevalError("PostgreSQL is not installed (no initdb); install it, e.g. `apt-get install postgresql`")


def _run_as() -> list[str]:
    """The prefix that runs a command as a non-root user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    raise TunevalError("running as root and no `postgres` or `nobody` user exists to run PostgreSQL; add one")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalPostgres:
    data_dir: Path
    port: int
    pid: int

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """A SQLAlchemy URL: ``psycopg2`` for MLflow, ``asyncpg`` for Prefect's server."""
        return f"postgresql+{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        cmd = [str(bin_dir() / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database]
        out = subprocess.run([*cmd, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql], capture_output=True, text=True)
        if out.returncode != 0:
            raise TunevalError(f"psql on port {self.port}: {out.stderr.strip()}")
        return out.stdout

    def create_database(self, name: str, extensions: tuple[str, ...] = ()) -> str:
        """Create ``name`` (and its extensions, e.g. Prefect's pg_trgm); returns its psycopg2 URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        for ext in extensions:
            self.psql(f"CREATE EXTENSION IF NOT EXISTS {ext}", name)
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown, then the data folder is removed."""
        if self.data_dir.exists():
            subprocess.run(
                [*_run_as(), str(bin_dir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        if alive(self.pid):  # pg_ctl could not stop it: do not leave a server behind
            os.kill(self.pid, 9)
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def alive(self) -> bool:
        return alive(self.pid)


def start(port: int | None = None) -> LocalPostgres:
    """initdb a fresh cluster in a new temporary folder and start it on 127.0.0.1:``port``."""
    prefix = _run_as()
    # Its own folder under the system temp dir (world-traversable), owned by the server's user.
    base = Path(tempfile.mkdtemp(prefix="tuneval-pg-"))
    data = base / "data"
    data.mkdir()
    if prefix:
        user = prefix[2]
        entry = pwd.getpwnam(user)
        for p in (base, data):
            os.chown(p, entry.pw_uid, entry.pw_gid)
    port = port or free_port()
    tools = bin_dir()
    try:
        init = subprocess.run(
            [
                *prefix,
                str(tools / "initdb"),
                "-A",
                "trust",
                "--no-sync",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "-D",
                str(data),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if init.returncode != 0:
            raise TunevalError(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
        opts = f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off -c full_page_writes=off -c max_connections=200"
        started = subprocess.run(
            [
                *prefix,
                str(tools / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(data / "server.log"),
                "-w",
                "start",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if started.returncode != 0:
            log = (data / "server.log").read_text(errors="replace") if (data / "server.log").exists() else ""
            raise TunevalError(f"PostgreSQL did not start on port {port}: {(log or started.stderr).strip()[-300:]}")
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return LocalPostgres(data, port, pid)
