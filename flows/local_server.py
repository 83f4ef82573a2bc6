"""A Prefect server on loopback, as a child process.

Prefect's embedded (ephemeral) server does not run the scheduler service, so cron schedules
never fire on it: ``tuneval serve`` without ``PREFECT_API_URL`` starts this one instead, on the
same ``PREFECT_HOME`` database. The tests use it for the server/worker path too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuneval.errors import TunevalError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def healthy(api_url: str, timeout: float = 5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def reachable(api_url: str, timeout: float = 10) -> bool:
    """Anything answers, even 401 (Prefect Cloud wants a key for /health): only no answer is unreachable."""
    try:
        urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@dataclass
class LocalServer:
    proc: subprocess.Popen[bytes]
    api_url: str
    log: Path

    def stop(self) -> None:
        """Terminate the server's whole process group (uvicorn and its services)."""
        stop_group(self.proc)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def start_server(
    port: int,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    log: Path | None = None,
    preexec: Callable[[], None] | None = None,
) -> LocalServer:
    """Start ``prefect server start`` on 127.0.0.1:port and wait until its API answers (output to ``log``)."""
    if port_in_use(port):
        raise TunevalError(
            f"port {port} is in use: if a Prefect server runs there, export "
            f"PREFECT_API_URL=http://127.0.0.1:{port}/api to use it; otherwise pass --port"
        )
    api_url = f"http://127.0.0.1:{port}/api"
    log = log or Path(tempfile.mkstemp(prefix="tuneval-prefect-server-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PREFECT_API_URL": api_url},
            start_new_session=True,  # its own process group, so stop() reaches every child
            preexec_fn=preexec,  # e.g. die with the parent (tuneval run --workers)
        )
    server = LocalServer(proc, api_url, log)
    deadline = time.monotonic() + timeout
    while not healthy(api_url, timeout=2):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise TunevalError(f"the Prefect server on port {port} did not start ({tail[0]}); see {log}")
        time.sleep(0.5)
    return server
