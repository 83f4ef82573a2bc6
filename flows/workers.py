"""Prefect process workers on this machine, one per GPU, pinned and limited to one run each, and
how they (and any server) are stopped: whole trees, in every case (``flows/local_stack.py`` puts
them together for ``tuneval run --workers N``).

A process worker builds each flow run's environment from its own (``{**os.environ, **job env}``),
so a worker started with ``CUDA_VISIBLE_DEVICES=i`` and ``--limit 1`` gives every run it takes that
one card and runs one at a time. On a CPU machine each worker gets ``cores / N`` torch threads.

Process hygiene: each server and worker is a session (process group) of its own and gets SIGTERM
when its parent dies (``PR_SET_PDEATHSIG``); stopping one stops its whole tree, because Prefect
starts every flow run in a new session of its own: signalling a worker's group alone would leave
its fine-tune running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tuneval.errors import TunevalError
from tuneval.processes import alive

QUERY_SECONDS = "1"  # how often a local worker asks for runs (Prefect's default, 10 s, idles a group's start)


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, without importing torch: ``CUDA_VISIBLE_DEVICES`` as listed,
    else one per card the NVIDIA driver shows; none without a driver."""
    if not Path("/proc/driver/nvidia/version").exists():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [x.strip() for x in listed.split(",") if x.strip()]
        return [] if ids[:1] == ["-1"] else ids
    cards = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(cards.iterdir())))] if cards.is_dir() else []


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_envs(ids: list[str], gpu: bool) -> list[dict[str, str]]:
    """Each worker's additions to the environment: its one device id; on a CPU, its share of cores
    (unless OMP_NUM_THREADS is set already)."""
    env = [{"CUDA_VISIBLE_DEVICES": i} for i in ids]
    if not gpu and "OMP_NUM_THREADS" not in os.environ:  # the user's own setting wins
        threads = str(max(1, cores() // max(1, len(ids))))
        env = [{**e, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for e in env]
    return env


def plan_local(workers: str) -> list[dict[str, str]]:
    """``--workers N|auto`` as worker environments: worker i on GPU i; ``auto`` one per visible GPU.
    On a machine without GPUs, N CPU workers (still numbered 0..N-1 in CUDA_VISIBLE_DEVICES)."""
    gpus = visible_gpus()
    if workers == "auto":
        if not gpus:
            raise TunevalError("--workers auto: no GPU is visible; pass --workers N to run N workers on the CPU")
        return worker_envs(gpus, gpu=True)
    n = int(workers)
    if gpus and n > len(gpus):
        raise TunevalError(f"--workers {n}: only {len(gpus)} GPUs are visible ({','.join(gpus)}); pass at most that")
    return worker_envs(gpus[:n], gpu=True) if gpus else worker_envs([str(i) for i in range(n)], gpu=False)


@dataclass
class Worker:
    name: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path | None


def start_worker(pool: str, name: str, env: dict[str, str], log: Path | None = None) -> Worker:
    """``prefect worker start`` for ``pool`` (type process, one run at a time) with ``env`` added."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    cmd += ["--limit", "1", "--name", name, "--install-policy", "never"]
    out = log.open("ab") if log else None
    try:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    finally:
        if out:
            out.close()
    return Worker(name, env, proc, log)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), in whatever session each one made for itself."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    stop_trees([proc], grace)


def stop_trees(procs: list[subprocess.Popen[bytes]], grace: float = 15) -> None:
    """SIGTERM the processes, their groups and every descendant's group, all at once; SIGKILL what is
    left after ``grace`` seconds."""
    pids: list[int] = []
    for proc in procs:
        pids += ([proc.pid] if proc.poll() is None else []) + descendants(proc.pid)
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            for proc in procs:
                proc.poll()  # reap our own children so they do not count as alive
            time.sleep(0.05)
        if not any(alive(p) for p in pids):
            break
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def ensure_pool(pool: str) -> bool:
    """Create process work pool ``pool`` on the current API if missing; True when created here."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            pass
        template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        except ObjectAlreadyExists:  # another process made it meanwhile
            return False
        return True


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C inside the block (Python's default would skip every finally)."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if main and previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if main and signal.getsignal(signal.SIGTERM) is on_term:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def running_workers(
    pool: str, envs: list[dict[str, str]], names: list[str], log_dir: Path | None = None, grace: float = 15
) -> Iterator[list[Worker]]:
    """One worker per env (``names[i]``, output to ``log_dir/<name>.log`` or inherited); all stopped
    together, with their flow runs, when the block ends however it ends (SIGKILL after ``grace`` s)."""
    workers: list[Worker] = []
    try:
        with sigterm_as_interrupt():
            for name, env in zip(names, envs, strict=True):
                workers.append(start_worker(pool, name, env, log_dir / f"{name}.log" if log_dir else None))
            yield workers
    finally:
        stop_trees([w.proc for w in workers], grace)
