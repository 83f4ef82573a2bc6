"""`tuneval worker --pool NAME [--gpus 0,1,...]`: how a machine joins a pool. One Prefect process
worker per GPU, each pinned (``CUDA_VISIBLE_DEVICES``) and limited to one run, in the foreground
until Ctrl-C or SIGTERM, which stop the workers and the runs they hold (a stopped run ends
CRASHED; ``tuneval run`` re-queues it for the pool's other workers)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from tuneval.errors import TunevalError


def gpus_arg(text: str) -> list[str]:
    ids = [x.strip() for x in text.split(",")]
    if not ids or not all(x.isdigit() for x in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct GPU ids separated by commas, e.g. 0,1,2")
    return ids


def cmd_worker(args: argparse.Namespace) -> int:
    from tuneval.flows.local_server import reachable
    from tuneval.flows.workers import ensure_pool, running_workers, visible_gpus, worker_envs

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise TunevalError(
            "PREFECT_API_URL is not set: export PREFECT_API_URL=http://HOST:4200/api, the server the "
            "submitting machine uses (`prefect server start --host 0.0.0.0` there)"
        )
    if not reachable(api):
        raise TunevalError(f"PREFECT_API_URL {api} cannot be reached; start the Prefect server or fix the URL")
    gpus = visible_gpus()
    ids = args.gpus or gpus or ["0"]  # no GPU: one CPU worker with every core
    if args.gpus and gpus and not set(args.gpus) <= set(gpus):
        raise TunevalError(f"--gpus {','.join(args.gpus)}: this machine shows GPUs {','.join(gpus)}; list those")
    envs = worker_envs(ids, gpu=bool(gpus))
    if ensure_pool(args.pool):
        print(f"created process work pool {args.pool} on {api}", flush=True)
    host = socket.gethostname()
    names = [f"{host}-{'gpu' if gpus else 'cpu'}{i}" for i in ids]
    with running_workers(args.pool, envs, names) as workers:
        for w in workers:
            extra = f", {w.env['OMP_NUM_THREADS']} threads" if "OMP_NUM_THREADS" in w.env else ""
            print(
                f"worker {w.name} (pid {w.proc.pid}) on pool {args.pool}: "
                f"CUDA_VISIBLE_DEVICES={w.env['CUDA_VISIBLE_DEVICES']}{extra}, one run at a time",
                flush=True,
            )
        print("Ctrl-C stops them", flush=True)
        try:
            return _watch(workers)
        except KeyboardInterrupt:
            print("stopping workers", file=sys.stderr, flush=True)
            return 0


def _watch(workers: list) -> int:
    """Until Ctrl-C: a worker that exits on its own is reported and the others go on (its run, if
    any, ends CRASHED and is re-queued by the dispatcher); with none left, a one-line error."""
    gone: set[str] = set()
    while True:
        for w in workers:
            if w.name not in gone and w.proc.poll() is not None:
                gone.add(w.name)
                print(f"warning: worker {w.name} exited with status {w.proc.returncode}", file=sys.stderr, flush=True)
        if len(gone) == len(workers):
            raise TunevalError(
                "every worker exited (see their output above); check PREFECT_API_URL and the pool, "
                "then start `tuneval worker` again"
            )
        time.sleep(1)
