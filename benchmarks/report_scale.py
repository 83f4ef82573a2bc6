"""`tuneval report` on a PostgreSQL MLflow store holding 1,000+ runs.

    python benchmarks/report_scale.py                 # 25 invocations x 48 runs = 1,200 runs
    python benchmarks/report_scale.py --invocations 50

Starts a throwaway PostgreSQL on loopback (``tuneval.postgres``), fills an MLflow store on it
(directly, ``postgresql+psycopg2://``) with recurring invocations shaped like real ones: 4 models x
3 benchmarks x 3 seeds, each seed group with its parent run, ~50 params, tags and test metrics with
CIs per run. Then times, each a few times (median), on the database directly and through an
``mlflow server`` on it:

- ``all runs``: what the report did before: every run of the experiment paged to the client;
- ``filtered``: ``tracking.queries.report_runs`` (server-side ``filter_string`` / ``order_by``);
- the whole ``tuneval report`` command (a subprocess: imports, queries, files, artifacts, tags).

Both queries must give the same leaderboard (checked here). Measured, never asserted in a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tuneval import postgres
from tuneval.reporting import publish
from tuneval.reporting import rules as rp
from tuneval.settings import Settings
from tuneval.tracking.client import Tracker
from tuneval.tracking.record import SeedGroup

MODELS, BENCHMARKS, SEEDS = ("m1", "m2", "m3", "m4"), ("b1", "b2", "b3"), (1, 2, 3)
BENCH = "{problem: classification, data: {files: {train: t.jsonl, test: t.jsonl}}}"
CONFIG = (
    "models: {"
    + ", ".join(f"{m}: {{source: org/{m}}}" for m in MODELS)
    + "}\n"
    + "benchmarks:\n"
    + "".join(f"  {b}: {BENCH}\n" for b in BENCHMARKS)
    + f"pipelines:\n  weekly: {{models: [{', '.join(MODELS)}], benchmarks: [{', '.join(BENCHMARKS)}]"
    + ", seeds: [1, 2, 3]}\n"
)


def fill(settings: Settings, invocations: int) -> int:
    """Write the store; returns the number of runs."""
    n = 0
    params = {f"train.p{i}": i * 0.1 for i in range(40)} | {"model.source": "org/x", "benchmark.max_length": 128}
    for i in range(invocations):
        s = dataclasses.replace(settings, invocation=f"2026{1 + i // 28:02d}{1 + i % 28:02d}T030000Z-{i:06x}")
        tracker = Tracker(s.tracking_uri, s.artifact_root)
        for m_i, model in enumerate(MODELS):
            for bench in BENCHMARKS:
                group = SeedGroup(s, "weekly", model, bench, list(SEEDS))
                results = []
                for seed in SEEDS:
                    acc = 0.7 + 0.05 * m_i + 0.002 * i + 0.01 * seed
                    tags = {"tuneval.pipeline": "weekly", "tuneval.model": model, "tuneval.benchmark": bench}
                    tags |= {"tuneval.seed": str(seed), "tuneval.invocation": s.invocation}
                    tags |= {"mlflow.parentRunId": group.run_id or "", "tuneval.cache": "finetune=ran,score=ran"}
                    rid = tracker.start("weekly", f"{model}__{bench}__seed{seed}", tags)
                    tracker.log_params(rid, params)
                    metrics = {"test_accuracy": acc, "test_accuracy_ci_low": acc - 0.02}
                    metrics |= {"test_accuracy_ci_high": acc + 0.02, "test_f1": acc - 0.01}
                    tracker.log_metrics(rid, metrics)
                    tracker.finish(rid, ok=True)
                    results.append(
                        {"pipeline": "weekly", "model": model, "benchmark": bench, "seed": seed}
                        | {"status": "completed", "metrics": {"accuracy": acc, "f1": acc - 0.01}}
                    )
                group.close(results)
                n += len(SEEDS) + 1
        print(f"  invocation {i + 1}/{invocations}: {n} runs", flush=True)
    return n


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(uri: str, project: Path, repeats: int) -> dict[str, float]:
    tracker = Tracker(uri)
    t_all, every = timed(lambda: tracker.pipeline_runs("weekly") or [], repeats)
    t_filtered, fetched = timed(lambda: publish.fetch(tracker, "weekly") or [], repeats)
    t_build_all, full = timed(lambda: rp.build("weekly", every), 1)
    part = rp.build("weekly", fetched)
    assert full is not None and part is not None
    assert (part.latest, part.changes, part.invocation) == (full.latest, full.changes, full.invocation)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "tuneval.cli", "report", "weekly", "--config", str(project / "pipelines.yaml")]
    cmd += ["--out", str(project / "reports")]
    t_cli, done = timed(lambda: subprocess.run(cmd, env=env, capture_output=True, text=True), repeats)
    assert done.returncode == 0, done.stderr
    return {
        "runs": len(every),
        "fetched": len(fetched),
        "all runs s": t_all,
        "filtered s": t_filtered,
        "build s": t_build_all,
        "tuneval report s": t_cli,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--invocations", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    project = Path(tempfile.mkdtemp(prefix="tuneval-report-scale-"))
    (project / "pipelines.yaml").write_text(CONFIG)
    (project / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
    pg = postgres.start()
    server = None
    try:
        db = pg.create_database("mlflow")
        settings = dataclasses.replace(
            Settings.from_env(project), tracking_uri=db, artifact_root=(project / "artifacts").as_uri()
        )
        t = time.perf_counter()
        runs = fill(settings, args.invocations)
        print(f"filled {runs} runs in {time.perf_counter() - t:.0f} s", flush=True)
        rows = {"PostgreSQL directly": measure(db, project, args.repeats)}
        port = postgres.free_port()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db, "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--workers", "1", "--artifacts-destination", (project / "artifacts").as_uri()]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        rows["mlflow server on it"] = measure(f"http://127.0.0.1:{port}", project, args.repeats)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn child
            server.wait(timeout=30)
        pg.stop()
    head = ["store", "runs", "fetched", "all runs s", "filtered s", "build s", "tuneval report s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in rows.items():
        cells = [name, *(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in head[1:])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
