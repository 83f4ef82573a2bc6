"""Seed groups as the unit of dispatch, and the files a worker leaves for whoever dispatched it.

A seed group is one pipeline x model x benchmark with its seeds: fused seeds train together and
its parent MLflow run carries their statistics, so it never splits across machines. A worker
running a group writes, under ``<cache>/invocations/<invocation>/`` (the cache every worker
shares, ``TUNEVAL_CACHE_DIR``):

- ``<group>.json``: the group's results, the same dicts a local run returns (atomic rename), plus
  where it ran (host, ``CUDA_VISIBLE_DEVICES``, pid, start and end);
- ``<group>.beat``: a heartbeat rewritten every few seconds while the group runs. A dispatcher
  that sees it stop changing knows the worker is gone even when nobody told Prefect (a machine
  lost, a worker and its run killed together): Prefect's own flow heartbeats come at most every
  30 s and need a server automation to act on them.

No Prefect here: the flows in ``flows/`` call these.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneval.config.runs import RunSpec
from tuneval.errors import TunevalError
from tuneval.settings import Settings
from tuneval.tracking.record import group_by_seeds

BEAT_SECONDS = 2.0
LOST_ENV = "TUNEVAL_WORKER_LOST_SECONDS"  # environment, not config: it depends on the machines and network


def lost_after_seconds() -> float:
    """How long a running group's heartbeat may stay unchanged before its worker counts as lost."""
    raw = os.environ.get(LOST_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise TunevalError(f"{LOST_ENV}={raw!r}: give the seconds (> 0) after which a silent worker counts as lost")
    return value


@dataclass(frozen=True)
class GroupRef:
    """What a dispatched group is, in plain values (a deployment's parameters)."""

    pipeline: str
    model: str
    benchmark: str
    seeds: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.pipeline}/{self.model}/{self.benchmark}"

    @property
    def slug(self) -> str:
        """A file and idempotency-key part: names are already restricted to [A-Za-z0-9_.-]."""
        return f"{self.pipeline}__{self.model}__{self.benchmark}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds)}


def groups_of(runs: list[RunSpec]) -> list[GroupRef]:
    return [GroupRef(p, m, b, tuple(r.seed for r in group)) for (p, m, b), group in group_by_seeds(runs).items()]


def select(runs: list[RunSpec], ref: GroupRef) -> list[RunSpec]:
    """The group's runs out of its pipeline's, in seed order as given; a stale reference is a user error."""
    mine = {r.seed: r for r in runs if (r.model_name, r.benchmark_name) == (ref.model, ref.benchmark)}
    missing = [s for s in ref.seeds if s not in mine]
    if missing or not ref.seeds:
        raise TunevalError(
            f"group {ref.name} seeds {list(ref.seeds)}: not in the pipeline as the worker reads it "
            f"(missing {missing or 'all'}); the worker's pipelines.yaml differs from the submitter's: share one"
        )
    return [mine[s] for s in ref.seeds]


def invocation_dir(settings: Settings) -> Path:
    return settings.cache_dir / "invocations" / settings.invocation


def result_path(settings: Settings, ref: GroupRef) -> Path:
    return invocation_dir(settings) / f"{ref.slug}.json"


def beat_path(settings: Settings, ref: GroupRef) -> Path:
    return invocation_dir(settings) / f"{ref.slug}.beat"


def where() -> dict[str, Any]:
    """This process's place: what the dispatcher and the tests read back."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def write_result(settings: Settings, ref: GroupRef, results: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    path = result_path(settings, ref)
    write_json_atomic(path, {"group": ref.to_json(), "invocation": settings.invocation, "results": results, **info})
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def heartbeat(path: Path, extra: dict[str, Any], every: float = BEAT_SECONDS) -> Iterator[None]:
    """Rewrite ``path`` every ``every`` seconds (a counter, the time, this process's place) until the
    block ends; a daemon thread, so a crash of any kind stops it. The file is removed at the end."""
    stop = threading.Event()
    info = {**where(), **extra}

    def beat() -> None:
        n = 0
        while True:
            n += 1
            try:
                write_json_atomic(path, {**info, "n": n, "time": time.time()})
            except OSError:
                pass  # a full or flaky disk must not kill the run; the dispatcher may then call it lost
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name="tuneval-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        path.unlink(missing_ok=True)


class BeatWatch:
    """The dispatcher's view of heartbeats: when did each one last change, by this process's clock
    (never comparing another machine's clock with ours)."""

    def __init__(self, lost_after: float):
        self.lost_after = lost_after
        self.seen: dict[Path, tuple[Any, float]] = {}

    def lost(self, path: Path) -> dict[str, Any] | None:
        """The last beat when ``path`` has not changed for ``lost_after`` seconds; None while it beats
        (or before it ever appeared: a run still starting, or a cache this machine cannot see)."""
        beat = read_json(path)
        now = time.monotonic()
        if beat is None:
            old = self.seen.get(path)
            return old[0] if old is not None and now - old[1] > self.lost_after else None
        old = self.seen.get(path)
        if old is None or old[0].get("n") != beat.get("n") or old[0].get("pid") != beat.get("pid"):
            self.seen[path] = (beat, now)
            return None
        return beat if now - old[1] > self.lost_after else None

    def ever_seen(self, path: Path) -> bool:
        return path in self.seen

    def forget(self, path: Path) -> None:
        self.seen.pop(path, None)
