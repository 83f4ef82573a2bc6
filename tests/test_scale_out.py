"""Scale-out on a real PostgreSQL: a Prefect server and an MLflow tracking server on it, two process
workers pinned with CUDA_VISIBLE_DEVICES=0 and =1, `tuneval run --pool` fanning seed groups out
over them; then a worker SIGKILLed mid-fine-tune, its group re-queued to the other worker and
resumed from its checkpoint to the same scores. Every process started here is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import tiny
from conftest import write_rows
from stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.scale]

POOL = "gpus"
TRAIN = "train: {epochs: 2, learning_rate: 2e-3, batch_size: 16, warmup_steps: 2, log_every_steps: 2}"
BENCH = """\
  {name}:
    problem: classification
    data: {{files: {{train: data/train.jsonl, validation: data/validation.jsonl, test: data/test.jsonl}}}}
    max_length: {max_length}
    metrics: [accuracy, f1]
"""
# Four groups: fan/toy and twin/toy share every artifact (same model, data, recipe, seed), so the two
# workers race for the same keys; fan/broken fails in prepare; seeds/toy-b has a parent run over two seeds.
CONFIG = (
    "models:\n  tiny: {source: ./models/bert}\nbenchmarks:\n"
    + BENCH.format(name="toy", max_length=32)
    + BENCH.format(name="toy-b", max_length=24)
    + BENCH.format(name="broken", max_length=32)
    + "    columns: {text: no_such_column}\n"
    + "pipelines:\n"
    + f"  fan:\n    models: [tiny]\n    benchmarks: [toy, broken]\n    seeds: [1]\n    {TRAIN}\n"
    + f"  twin:\n    models: [tiny]\n    benchmarks: [toy]\n    seeds: [1]\n    {TRAIN}\n"
    + f"  seeds:\n    models: [tiny]\n    benchmarks: [toy-b]\n    seeds: [1, 2]\n    {TRAIN}\n"
    + "  long:\n    models: [tiny]\n    benchmarks: [toy]\n    seeds: [3]\n"
    + "    train: {epochs: 1, batch_size: 4, learning_rate: 1e-3, warmup_steps: 5, checkpoint_every_steps: 10}\n"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        s.start()
        s.pool(POOL)
        for device in ("0", "1"):
            s.add_worker(POOL, device)
        yield s
    finally:
        s.close()
        assert not s.left_running(), s.left_running()


def tuneval(env: dict[str, str], *args: str, timeout: int = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneval.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _project(project: Path) -> Path:
    write_rows(project / "data" / "train.jsonl", tiny.sentiment_rows(400, 1))
    (project / "pipelines.yaml").write_text(CONFIG)
    return project / "pipelines.yaml"


def _group_runs(api_url: str, invocation: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tag = FlowRunFilterTags(all_=[f"tuneval-invocation:{invocation}"])
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=tag))


def _max_overlap(runs: list[Any]) -> int:
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _mlflow_pg(stack: Stack) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack.pg.url("mlflow"))  # the database itself, not the server


def test_groups_fan_out_over_two_pinned_workers(stack: Stack, project: Path) -> None:
    cfg = _project(project)
    env = {**os.environ, **stack.env}
    out = tuneval(
        env, "run", "fan", "twin", "seeds", "--pool", POOL, "--config", str(cfg), "--json", str(project / "r.json")
    )
    logs = "".join((stack.folder / f"worker-{d}.log").read_text(errors="replace")[-2000:] for d in "01")
    assert out.returncode != 0, out.stdout + out.stderr + logs
    assert "error: fan/tiny/broken/seed 1" in out.stderr and "no_such_column" in out.stderr, out.stderr + logs
    assert "Traceback" not in out.stderr
    runs = json.loads((project / "r.json").read_text())["runs"]
    by = {(r["pipeline"], r["benchmark"], r["seed"]): r for r in runs}
    assert sorted(by) == [
        ("fan", "broken", 1),
        ("fan", "toy", 1),
        ("seeds", "toy-b", 1),
        ("seeds", "toy-b", 2),
        ("twin", "toy", 1),
    ]
    assert [k for k, r in by.items() if r["status"] != "completed"] == [("fan", "broken", 1)]
    assert any(line.split()[2:5] == ["broken", "1", "failed"] for line in out.stdout.splitlines()), out.stdout

    # Each run saw one device id; both workers were used; never more than two groups at once.
    devices = [r["worker"]["cuda_visible_devices"] for r in runs]
    assert set(devices) == {"0", "1"}, devices
    assert all(r["worker"]["torch_threads"] == "1" for r in runs)
    invocation = out.stderr.split("invocation ")[1].split(":")[0]
    groups = _group_runs(stack.prefect.api_url, invocation)
    assert len(groups) == 4 and all(g.start_time and g.end_time for g in groups)
    assert _max_overlap(groups) <= 2

    # The store's locks across workers: the twin groups raced for the same keys; one built, one reused.
    a, b = by[("fan", "toy", 1)], by[("twin", "toy", 1)]
    assert sorted([a["stages"]["finetune"]["status"], b["stages"]["finetune"]["status"]]) == ["cached", "ran"]
    assert a["metrics"] == b["metrics"]

    # MLflow, read from PostgreSQL itself: completed groups FINISHED, the broken one FAILED; artifacts shared.
    client = _mlflow_pg(stack)
    status: dict[str, list[str]] = {}
    for name in ("fan", "twin", "seeds"):
        exp = client.get_experiment_by_name(name)
        for run in client.search_runs([exp.experiment_id], f"tags.`tuneval.invocation` = '{invocation}'"):
            status.setdefault(f"{name}/{run.data.tags['mlflow.runName']}", []).append(run.info.status)
    assert status == {
        "fan/tiny__toy__seed1": ["FINISHED"],
        "fan/tiny__broken__seed1": ["FAILED"],
        "twin/tiny__toy__seed1": ["FINISHED"],
        "seeds/tiny__toy-b": ["FINISHED"],  # the seed group's parent, with its statistics
        "seeds/tiny__toy-b__seed1": ["FINISHED"],
        "seeds/tiny__toy-b__seed2": ["FINISHED"],
    }, status
    assert len(list((stack.folder / "shared-artifacts").rglob("predictions.parquet"))) == 4

    # The same invocation submitted again: the idempotency keys return the runs it has, none run twice.
    again = tuneval(
        env,
        "run",
        "fan",
        "twin",
        "seeds",
        "--pool",
        POOL,
        "--config",
        str(cfg),
        "--json",
        str(project / "again.json"),
        "--invocation",
        invocation,
    )
    assert again.returncode == out.returncode, again.stderr
    ids = sorted(r["dispatch"]["flow_run_id"] for r in json.loads((project / "again.json").read_text())["runs"])
    assert ids == sorted(r["dispatch"]["flow_run_id"] for r in runs)
    assert len(_group_runs(stack.prefect.api_url, invocation)) == 4


def _wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[str], what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert proc.poll() is None, f"the run ended before {what}: " + (proc.stdout.read() if proc.stdout else "")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def test_worker_killed_mid_finetune_resumes_on_the_other(stack: Stack, project: Path, tmp_path: Path) -> None:
    cfg = _project(project)
    # One torch thread, as on the workers: another thread count may sum in another order.
    base = {**os.environ, "PYTHONPATH": stack.env["PYTHONPATH"], "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ref = tuneval(
        {**base, "TUNEVAL_CACHE_DIR": str(tmp_path / "ref-cache")},
        "run",
        "long",
        "--config",
        str(cfg),
        "--no-track",
        "--json",
        str(tmp_path / "ref.json"),
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr

    env = {**os.environ, **stack.env, "TUNEVAL_WORKER_LOST_SECONDS": "6"}
    cache = Path(stack.env["TUNEVAL_CACHE_DIR"])
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneval.cli",
            "run",
            "long",
            "--pool",
            POOL,
            "--config",
            str(cfg),
            "--json",
            str(project / "k.json"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:

        def mid_epoch() -> Path | None:
            found = [p for p in cache.glob("finetune/*.work/ckpt-*-0.pt") if int(p.name.split("-")[1]) >= 20]
            return found[0].parent if found else None

        work = _wait_for(mid_epoch, 240, run, "a checkpoint at step 20")
        beat = json.loads(next(cache.glob("invocations/*/long__tiny__toy.beat")).read_text())
        victim = next(w for w in stack.workers if w.device == beat["cuda_visible_devices"])
        stack.seen.update([beat["pid"], victim.proc.pid, victim.worker_pid])
        # The machine dies: the run, its Prefect worker and `tuneval worker` (each a session of its own)
        # go at once; no one is left to report anything.
        for group in (beat["pgid"], victim.worker_pid, victim.proc.pid):
            os.killpg(group, signal.SIGKILL)
        victim.proc.wait(timeout=30)
        assert not (work.parent / work.name.removesuffix(".work") / "manifest.json").exists()  # died mid-training
        output = run.communicate(timeout=400)[0]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, output
    assert "worker lost" in output and "re-queued" in output, output
    [resumed] = json.loads((project / "k.json").read_text())["runs"]
    [reference] = json.loads((tmp_path / "ref.json").read_text())["runs"]
    assert resumed["worker"]["attempt"] == 2
    assert resumed["worker"]["cuda_visible_devices"] != beat["cuda_visible_devices"]  # the other worker took it
    assert resumed["stages"]["finetune"]["status"] == "ran"
    assert resumed["metrics"] == reference["metrics"]
    survivor = next(w for w in stack.workers if w is not victim)
    assert "resuming from checkpoint" in survivor.log.read_text(errors="replace")
    logits = [
        pq.read_table(c / "predict" / r["stages"]["predict"]["key"] / "predictions.parquet")
        .column("logits")
        .to_pylist()
        for c, r in ((cache, resumed), (tmp_path / "ref-cache", reference))
    ]
    assert logits[0] == logits[1]

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.prefect.api_url}), get_client(sync_client=True) as client:
        states = [s.type.value for s in client.read_flow_run_states(resumed["dispatch"]["flow_run_id"])]
    assert "CRASHED" in states and states[-1] == "COMPLETED", states

    client = _mlflow_pg(stack)
    exp = client.get_experiment_by_name("long")
    mine = client.search_runs([exp.experiment_id], "tags.`tuneval.model` = 'tiny'")
    assert sorted(r.info.status for r in mine) == ["FINISHED", "KILLED"]  # the crashed attempt, closed
    assert [r.data.tags.get("tuneval.superseded") for r in mine if r.info.status == "KILLED"] == ["true"]
