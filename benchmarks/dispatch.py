"""Seed groups one after another against `tuneval run --workers N`: wall time and dispatch overhead.

    python benchmarks/dispatch.py                  # 4 tiny groups, serial vs --workers 2
    python benchmarks/dispatch.py --groups 8 --workers 4 --rows 2000

A project of G groups (a tiny BERT built from a config, G benchmarks that differ in max_length so
no artifact is shared, one seed each), every variant in a fresh cache, all through the CLI:

- ``serial``: ``tuneval run`` (the groups one after another in one process, torch's default threads);
- ``workers``: ``tuneval run --workers N`` (a loopback Prefect server, a process pool, N workers,
  each pinned to one device id and ``cores / N`` torch threads);
- ``workers, cached``: the same again with ``--always-flow``: every stage is cached, so all of its
  wall time is orchestration.

Dispatch overhead per group, two ways: (wall - the groups' own stage seconds) / G, and
(N x wall - stage seconds) / G, the worker-seconds a group costs beyond its stages (process start
and imports, Prefect state changes, result files, pickup); the start-up (launch to the first
group's body: server, pool, workers, the first runs' processes) is shown apart. MLflow off
(``--no-track``) unless ``--track``. A worker's stage seconds include what its fresh process pays
on first use (torch, transformers, datasets imported inside the stages), which the serial run pays
once: the last column charges that to dispatch too, against the serial run's stage seconds.
``OMP_NUM_THREADS=1`` gives the serial run one torch thread too. Measured, never asserted in a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402 - the tests' tiny model and toy data

BENCH = """\
  toy{i}:
    problem: classification
    data: {{files: {{train: data/train.jsonl, validation: data/validation.jsonl, test: data/test.jsonl}}}}
    max_length: {max_length}
"""


def project(folder: Path, groups: int, rows: int) -> Path:
    tiny.bert(folder / "models" / "bert")
    for split, n, seed in (("train", rows, 1), ("validation", 40, 2), ("test", 60, 3)):
        path = folder / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in tiny.sentiment_rows(n, seed)))
    names = ", ".join(f"toy{i}" for i in range(groups))
    cfg = folder / "pipelines.yaml"
    cfg.write_text(
        "models:\n  tiny: {source: ./models/bert}\nbenchmarks:\n"
        + "".join(BENCH.format(i=i, max_length=24 + 2 * i) for i in range(groups))
        + f"pipelines:\n  bench:\n    models: [tiny]\n    benchmarks: [{names}]\n    seeds: [1]\n"
        + "    train: {epochs: 2, learning_rate: 2e-3, batch_size: 16, warmup_steps: 2}\n"
    )
    return cfg


def run(cfg: Path, cache: Path, out: Path, *extra: str, track: bool) -> dict[str, float]:
    env = {**os.environ, "TUNEVAL_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tuneval.cli", "run", "--config", str(cfg), "--json", str(out), *extra]
    if not track:
        cmd.append("--no-track")
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'serial'} failed:\n{done.stdout}\n{done.stderr}")
    runs = json.loads(out.read_text())["runs"]
    stages = sum(s["seconds"] or 0 for r in runs for s in r["stages"].values())
    firsts = [t for p in cache.glob("invocations/*/*.json") if (t := json.loads(p.read_text())["started"]) >= start]
    return {"wall": wall, "stages": stages, "startup": (min(firsts) - start) if firsts else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", type=int, default=240, help="training rows per group")
    p.add_argument("--track", action="store_true", help="log to MLflow (a SQLite store in the project)")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tuneval-dispatch-bench-"))
    cfg = project(folder, args.groups, args.rows)
    n = str(args.workers)
    results = {
        "serial": run(cfg, folder / "c-serial", folder / "serial.json", track=args.track),
        "workers": run(cfg, folder / "c-workers", folder / "w.json", "--workers", n, track=args.track),
    }
    results["workers, cached"] = run(
        cfg, folder / "c-workers", folder / "wc.json", "--workers", n, "--always-flow", track=args.track
    )
    print(f"\n{args.groups} groups, {args.rows} training rows each, {args.workers} workers, MLflow {args.track}")
    print(
        "| variant | wall s | stage s (sum) | start-up s | (wall - stages) / G | (N wall - stages) / G "
        "| (N wall - serial stages) / G |"
    )
    print("|---|---|---|---|---|---|---|")
    g, serial_stages = args.groups, results["serial"]["stages"]
    for name, r in results.items():
        k = 1 if name == "serial" else args.workers
        cells = [name, f"{r['wall']:.1f}", f"{r['stages']:.1f}", f"{r['startup']:.1f}" if k > 1 else "-"]
        cells += [f"{(r['wall'] - r['stages']) / g:.1f}", f"{(k * r['wall'] - r['stages']) / g:.1f}"]
        cells.append(f"{(k * r['wall'] - serial_stages) / g:.1f}")
        print("| " + " | ".join(cells) + " |")
    print(f"speed-up of --workers {n} over serial: {results['serial']['wall'] / results['workers']['wall']:.2f}x")


if __name__ == "__main__":
    main()
