"""Prefect's temporary API server, started early.

Without ``PREFECT_API_URL`` Prefect starts a temporary server on the first client call: it
imports the whole server package in this process (~6 s) and then waits for a uvicorn child
to come up (~5 s), all after our own imports. Starting the same child ourselves (the command
and environment of ``prefect.server.api.server.SubprocessASGIServer``) as soon as we know a
flow will run lets both start-ups overlap, and this process never imports the server package.
This module imports nothing from prefect at import time, so it is cheap to load.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import time

from tuneval.flows.local_server import free_port, healthy


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # A SIGKILLed tuneval must not leave its server behind (Linux only; elsewhere atexit does it).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EarlyServer:
    """A temporary Prefect API server on 127.0.0.1, for one tuneval invocation."""

    def __init__(self) -> None:
        import importlib.util

        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                os.path.dirname(os.path.dirname(spec.origin)),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """True once /api/health answers; False if the child died or the timeout passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if healthy(self.api_url, timeout=2):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_SERVER: EarlyServer | None = None


def early_server() -> EarlyServer | None:
    """This process's early server, started on first use and stopped at exit (as Prefect's own).

    None when Prefect is already in use in this process without it (tests calling the CLI
    in-process): its clients and event workers keep the API they started with, so switching
    would leave them talking to a server that is gone.
    """
    global _SERVER
    if _SERVER is not None and _SERVER.process.poll() is None:
        return _SERVER
    if "prefect" in sys.modules and _SERVER is None:
        return None
    _SERVER = EarlyServer()
    atexit.register(_SERVER.stop)
    return _SERVER
