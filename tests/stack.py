"""Test helper: the multi-machine set-up on one machine. PostgreSQL on loopback, a Prefect server
and an MLflow tracking server on it (artifacts proxied into a shared folder), a process work pool
and process workers; every process it starts is stopped by ``close()`` (and tracked for checks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tuneval.flows.local_server import LocalServer, free_port, start_server
from tuneval.flows.workers import descendants, ensure_pool, stop_trees

from tuneval import postgres
from tuneval.processes import alive

ROOT = Path(__file__).resolve().parents[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Machine:
    device: str  # its CUDA_VISIBLE_DEVICES
    proc: subprocess.Popen[bytes]  # `tuneval worker`
    log: Path  # its output and its Prefect worker's (the runs' output included)
    worker_pid: int  # the Prefect process worker it started


@dataclass
class Stack:
    folder: Path
    pg: postgres.LocalPostgres | None = None
    prefect: LocalServer | None = None
    mlflow: subprocess.Popen[bytes] | None = None
    mlflow_uri: str = ""
    workers: list[Machine] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # every pid started here or below (for the orphan check)
    sampler: threading.Event = field(default_factory=threading.Event)

    @property
    def env(self) -> dict[str, str]:
        """What every process of the set-up shares: the two servers and the cache."""
        return {
            "PREFECT_API_URL": self.prefect.api_url if self.prefect else "",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "TUNEVAL_CACHE_DIR": str(self.folder / "shared-cache"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }

    def start(self) -> Stack:
        self.pg = postgres.start()
        prefect_db = self.pg.create_database("prefect", ("pg_trgm",))
        mlflow_db = self.pg.create_database("mlflow")
        artifacts = self.folder / "shared-artifacts"
        artifacts.mkdir(parents=True)
        port = free_port()
        self.mlflow_uri = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_db]
        cmd += ["--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--workers", "1"]
        # No job runner: its ten queue consumers (~250 MB each) do nothing for tracking.
        menv = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with (self.folder / "mlflow.log").open("wb") as out:
            self.mlflow = subprocess.Popen(cmd, env=menv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        env = {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db.replace("+psycopg2", "+asyncpg"),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_HOME": str(self.folder / "prefect-home"),
        }
        self.prefect = start_server(free_port(), env, log=self.folder / "prefect.log", timeout=180)
        deadline = time.monotonic() + 120
        while not http_ok(f"{self.mlflow_uri}/health"):
            assert self.mlflow.poll() is None, (self.folder / "mlflow.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        self.note()
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        """Flow-run processes come and go between checks: note the tree twice a second."""
        while not self.sampler.wait(0.5):
            self.note()

    def pool(self, name: str) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.prefect.api_url}):
            ensure_pool(name)

    def add_worker(self, pool: str, device: str) -> Machine:
        """A "machine": `tuneval worker --pool POOL --gpus DEVICE` (one torch thread), its own session."""
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log = self.folder / f"worker-{device}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tuneval.cli", "worker", "--pool", pool, "--gpus", device],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while not (line := re.search(r"\(pid (\d+)\) on pool", log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        machine = Machine(device, proc, log, int(line.group(1)))
        self.workers.append(machine)
        self.note()
        return machine

    def note(self) -> None:
        """Remember every process below the servers and workers (flow runs start sessions of their own)."""
        roots = [p.pid for p in (self.mlflow, self.prefect.proc if self.prefect else None) if p is not None]
        roots += [w.proc.pid for w in self.workers]
        for pid in roots:
            self.seen.update([pid, *descendants(pid)])

    def close(self) -> None:
        self.sampler.set()
        self.note()
        servers = [p for p in (self.mlflow, self.prefect.proc if self.prefect else None) if p is not None]
        stop_trees([w.proc for w in self.workers] + servers, grace=10)  # every tree at once
        if self.pg is not None:
            self.pg.stop()
            self.seen.add(self.pg.pid)

    def left_running(self) -> list[int]:
        return [p for p in self.seen if alive(p)]
