"""`tuneval run --workers 2` on one machine with no set-up: it starts a loopback Prefect server, a
process pool and two pinned workers, fans the seed groups out, and stops every process it started,
when a group fails and on Ctrl-C alike (every process seen below it is gone afterwards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tiny
from conftest import write_rows
from test_scale_out import CONFIG
from tuneval.flows.workers import descendants

from tuneval.processes import alive

pytestmark = [pytest.mark.integration, pytest.mark.scale]


class Watched:
    """A `tuneval run` subprocess and every process ever seen below it (sampled 3 times a second)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tuneval.cli", "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.seen: set[int] = set()
        self.stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop.wait(0.3):
            self.seen.update(descendants(self.proc.pid))

    def finish(self, timeout: float) -> tuple[str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.stop.set()
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return out, err

    def left_running(self) -> list[int]:
        deadline = time.monotonic() + 10  # SIGKILLed stragglers need a moment to be reaped
        while (left := [p for p in self.seen if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def _project(project: Path) -> Path:
    write_rows(project / "data" / "train.jsonl", tiny.sentiment_rows(400, 1))
    (project / "pipelines.yaml").write_text(CONFIG)
    return project / "pipelines.yaml"


def test_two_local_workers_and_a_failed_group_leave_nothing_behind(project: Path) -> None:
    cfg = _project(project)
    run = Watched("fan", "--workers", "2", "--config", str(cfg), "--json", str(project / "out.json"))
    out, err = run.finish(timeout=300)
    assert run.proc.returncode == 2, out + err
    assert "2 groups on 2 local workers (CUDA_VISIBLE_DEVICES=0, CUDA_VISIBLE_DEVICES=1" in err, err
    assert "error: fan/tiny/broken/seed 1" in err and "Traceback" not in err, err
    runs = {r["benchmark"]: r for r in json.loads((project / "out.json").read_text())["runs"]}
    assert runs["toy"]["status"] == "completed" and runs["toy"]["metrics"]["accuracy"] > 0.5
    assert runs["broken"]["status"] == "failed"
    assert {r["worker"]["cuda_visible_devices"] for r in runs.values()} <= {"0", "1"}
    assert all(r["worker"]["torch_threads"] == str(max(1, len(os.sched_getaffinity(0)) // 2)) for r in runs.values())
    assert len(run.seen) >= 5  # the server, two workers and the groups' runs were seen
    assert not run.left_running()


def test_ctrl_c_stops_the_server_the_workers_and_their_runs(project: Path) -> None:
    cfg = _project(project)
    run = Watched("long", "--workers", "2", "--config", str(cfg))
    cache = project / ".tuneval" / "cache"
    deadline = time.monotonic() + 240
    while not list(cache.glob("invocations/*/long__tiny__toy.beat")):  # a group is running on a worker
        assert run.proc.poll() is None, run.finish(5)
        assert time.monotonic() < deadline, "no group started"
        time.sleep(0.2)
    beat = json.loads(next(cache.glob("invocations/*/long__tiny__toy.beat")).read_text())
    run.seen.add(beat["pid"])
    run.proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends it
    out, err = run.finish(timeout=120)
    assert run.proc.returncode == 130 and "interrupted" in err, out + err
    assert not run.left_running()
    assert not list(cache.glob("finetune/*/manifest.json"))  # interrupted mid-training, nothing committed
