"""The one-machine stack of ``tuneval run --workers N``: a loopback Prefect server (unless
``PREFECT_API_URL`` names one), a process work pool and N pinned workers (``flows/workers.py``),
all stopped when the invocation ends, by a failure, Ctrl-C or SIGTERM alike."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tuneval.flows.local_server import LocalServer, free_port, start_server
from tuneval.flows.workers import (
    QUERY_SECONDS,
    Worker,
    die_with_parent,
    ensure_pool,
    running_workers,
    sigterm_as_interrupt,
    stop_trees,
)

STOP_GRACE = 3.0  # seconds a --workers stack's processes get between SIGTERM and SIGKILL
# Server services a throwaway --workers server never needs (no schedules, automations, pauses or
# cancellations; the dispatcher itself notices lost runs): each polls the database on the CPUs
# the fine-tunes need. The task-run recorder and event persister stay: they record what ran.
IDLE_SERVICES = {
    f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
    for name in (
        "SCHEDULER",
        "LATE_RUNS",
        "FOREMAN",
        "TRIGGERS",
        "PAUSE_EXPIRATIONS",
        "CANCELLATION_CLEANUP",
        "REPOSSESSOR",
        "CLEANUP_RECONCILER",
        "DB_VACUUM",
    )
}


@dataclass
class LocalStack:
    api_url: str
    pool: str
    log_dir: Path
    workers: list[Worker] = field(default_factory=list)
    server: LocalServer | None = None


@contextmanager
def local_stack(envs: list[dict[str, str]], pool: str, log_dir: Path) -> Iterator[LocalStack]:
    """A Prefect server on loopback (or ``PREFECT_API_URL``'s), process pool ``pool`` and one worker per
    env; all stopped when the block ends, by an exception, Ctrl-C or SIGTERM alike."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log_dir.mkdir(parents=True, exist_ok=True)
    db_dir = Path(tempfile.mkdtemp(prefix="tuneval-prefect-"))
    stack = LocalStack(api_url=os.environ.get("PREFECT_API_URL", ""), pool=pool, log_dir=log_dir)
    created = False
    try:
        with sigterm_as_interrupt():
            if not stack.api_url:
                # A private database: never the user's PREFECT_HOME one, which a `tuneval serve` may be using.
                env = {
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db_dir / 'prefect.db'}",
                    "PREFECT_UI_ENABLED": "false",
                    **IDLE_SERVICES,
                }
                stack.server = start_server(free_port(), env, log=log_dir / "server.log", preexec=die_with_parent)
                stack.api_url = stack.server.api_url
            with temporary_settings({PREFECT_API_URL: stack.api_url}):
                created = ensure_pool(pool)
            base = {"PREFECT_API_URL": stack.api_url, "PREFECT_WORKER_QUERY_SECONDS": QUERY_SECONDS}
            names = [f"worker-{i}" for i in range(len(envs))]
            # A throwaway stack: its runs are checkpointed and its server's database is deleted, so
            # a short grace (the workers' own shutdown takes 5-15 s) does not lose anything.
            with running_workers(pool, [{**base, **e} for e in envs], names, log_dir, grace=STOP_GRACE) as workers:
                stack.workers = workers
                yield stack
    finally:
        if created and stack.server is None:  # a pool made on the user's server: remove it again
            _delete_pool(pool, stack.api_url)
        if stack.server is not None:
            stop_trees([stack.server.proc], STOP_GRACE)
        shutil.rmtree(db_dir, ignore_errors=True)


def _delete_pool(pool: str, api_url: str) -> None:
    """Remove the pool made on the user's server, and the group deployment registered on it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            try:
                client.delete_deployment(client.read_deployment_by_name(f"tuneval-group/{pool}").id)
            finally:
                client.delete_work_pool(pool)
    except Exception:  # noqa: BLE001 - cleanup of a convenience: never hide the run's own outcome
        pass
