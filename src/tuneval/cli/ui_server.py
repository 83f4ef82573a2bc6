"""The ``mlflow ui`` child of ``tuneval ui``: started in its own process group, stopped whole.

``mlflow ui`` is a tree: the CLI process, uvicorn and its workers, MLflow's job runner and its
huey consumers (ten processes on MLflow 3.17). Killing the CLI alone leaves the rest serving and
holding the port, so the child gets a session of its own and stopping signals its whole group:
SIGTERM, then SIGKILL for what is still there after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

GRACE_SECONDS = 15.0  # huey consumers take a few seconds to finish on SIGTERM


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port (SO_REUSEADDR as servers bind, so a closed
    connection's TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, start_new_session=True)


def group_alive(proc: subprocess.Popen[bytes]) -> bool:
    proc.poll()  # reap the leader, so that a zombie does not count
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(proc: subprocess.Popen[bytes], grace: float = GRACE_SECONDS) -> None:
    """Stop the child's whole process group; returns once none of it is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(proc):
                return
            time.sleep(0.1)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> bool:
    """True once ``url`` answers 200; False when the child exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


class Stop(Exception):
    """SIGINT or SIGTERM arrived: stop serving."""


@contextmanager
def stopping_on_signals(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGINT and SIGTERM end the block (as ``Stop``); whatever ends it, the child's group is
    stopped, with further signals ignored while that happens."""

    def raise_stop(signum: int, frame: object) -> None:
        raise Stop(signum)

    handlers: dict[int, Callable[..., object] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, raise_stop)
    try:
        yield
    except Stop:
        pass
    finally:
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)
        stop(proc)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
