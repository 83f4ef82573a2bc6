"""`tuneval run --pool NAME` and `tuneval run --workers N|auto`: the invocation's seed groups fan out
over a Prefect work pool (``tuneval.flows.dispatch``) instead of running one after another here.

``--pool``: workers elsewhere (``tuneval worker``) on the server ``PREFECT_API_URL`` names.
``--workers``: this machine, no set-up: a loopback Prefect server (or ``PREFECT_API_URL``'s), a
process pool and N workers pinned to one GPU each (``tuneval.flows.workers``), all stopped after.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Any

from tuneval.errors import TunevalError

INVOCATION = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def workers_arg(text: str) -> str:
    """argparse type of ``--workers``: a positive count or ``auto``."""
    if text == "auto" or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of workers or auto")


def count_arg(text: str) -> int:
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: give a count (0 or more)")


def check_args(args: argparse.Namespace) -> None:
    """Combinations a parser cannot express, each a one-line user error."""
    if args.pool and args.workers:
        raise TunevalError("--workers and --pool: pick one (--workers starts its own pool on this machine)")
    if args.invocation and not args.pool:
        raise TunevalError("--invocation re-attaches to groups already on a pool: use it with --pool")
    if args.invocation and not INVOCATION.match(args.invocation):
        raise TunevalError(f"--invocation {args.invocation!r}: expected an id like 20261126T074000Z-3f9a1c")
    if args.workers:
        from tuneval.flows.workers import plan_local

        plan_local(args.workers)  # `auto` without a GPU, more workers than GPUs: said before any planning
    from tuneval.pipeline.groups import lost_after_seconds

    lost_after_seconds()


def dispatch_run(args: argparse.Namespace, loaded: Any, runs: list[Any], settings: Any) -> list[dict[str, Any]]:
    """Every seed group of ``runs`` through the work pool; the same result dicts as a local run."""
    from tuneval.flows.deployments import check_pool, config_parameter
    from tuneval.flows.dispatch import Dispatch, run_dispatch
    from tuneval.pipeline.groups import groups_of, invocation_dir, lost_after_seconds

    refs = groups_of(runs)
    source = str(loaded.root)
    config = config_parameter(loaded.path, source)
    how = {"config": config, "source": source, "retries": args.retries, "lost_after": lost_after_seconds()}
    if args.pool:
        check_pool(args.pool)  # PREFECT_API_URL set and reachable, the pool exists: else one error line
        if settings.track and settings.tracking_uri.startswith("sqlite:"):
            print(
                f"warning: MLflow store {settings.tracking_uri} is a SQLite file: workers on other machines "
                "need MLFLOW_TRACKING_URI pointing at a tracking server (see README, Scale out)",
                file=sys.stderr,
            )
        print(f"invocation {settings.invocation}: {len(refs)} groups on pool {args.pool}", file=sys.stderr, flush=True)
        try:
            return run_dispatch(None, refs, settings, args.force, Dispatch(args.pool, **how))
        except KeyboardInterrupt:
            print(
                f"interrupted: the groups keep running on pool {args.pool}; wait for them again with "
                f"`tuneval run --pool {args.pool} --invocation {settings.invocation}` (same pipelines)",
                file=sys.stderr,
            )
            raise
    from tuneval.flows.local_stack import local_stack
    from tuneval.flows.workers import plan_local

    envs = plan_local(args.workers)
    pool = f"tuneval-local-{settings.invocation}"
    log_dir = invocation_dir(settings) / "local"
    devices = ", ".join(f"CUDA_VISIBLE_DEVICES={e['CUDA_VISIBLE_DEVICES']}" for e in envs)
    threads = f", {envs[0]['OMP_NUM_THREADS']} torch threads each" if "OMP_NUM_THREADS" in envs[0] else ""
    plural = "workers" if len(envs) > 1 else "worker"
    print(
        f"invocation {settings.invocation}: {len(refs)} groups on {len(envs)} local {plural} ({devices}{threads})",
        file=sys.stderr,
        flush=True,
    )
    with local_stack(envs, pool, log_dir) as stack:
        print(f"Prefect API {stack.api_url}; server and worker logs in {log_dir}", file=sys.stderr, flush=True)
        # Our workers run this interpreter: each group's run starts as one engine process.
        command = shlex.join([sys.executable, "-m", "prefect.engine"])
        return run_dispatch(stack.api_url, refs, settings, args.force, Dispatch(pool, **how, command=command))
