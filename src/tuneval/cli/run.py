"""`tuneval run`: plan (all cached?), run through Prefect or record, print the results."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from tuneval.cli.tables import results_table, summary_table
from tuneval.errors import TunevalError


def cmd_run(args: argparse.Namespace) -> int:
    from tuneval.config import load_config, resolve_runs
    from tuneval.settings import Settings

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise TunevalError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist; create it")
    from tuneval.cli import dispatch

    dispatch.check_args(args)
    loaded = load_config(args.config)
    runs = resolve_runs(loaded, args.pipelines)  # every check that needs no model, before any flow starts
    settings = Settings.from_env(loaded.root, track=not args.no_track)
    if args.invocation:  # re-attach: the same idempotency keys find the groups already submitted
        settings = dataclasses.replace(settings, invocation=args.invocation)
    fan_out = bool(args.pool or args.workers)
    from tuneval.pipeline import runner

    # Nothing to build: record the runs (MLflow, JSON, table) with the plain stage functions and
    # skip Prefect, whose server start-up would be most of the time. --always-flow overrides.
    cached = not args.always_flow and not args.invocation and runner.all_cached(runs, settings, args.force)
    server = None
    if not cached and not fan_out and not os.environ.get("PREFECT_API_URL"):
        from tuneval.flows.ephemeral_server import early_server

        server = early_server()  # starts while MLflow and Prefect import below
    if settings.track:
        from tuneval.tracking.client import Tracker

        Tracker(settings.tracking_uri, settings.artifact_root).check()
    if cached:
        results = runner.run_groups(runs, settings, runner.run_plain)
    elif fan_out:
        results = dispatch.dispatch_run(args, loaded, runs, settings)
    else:
        results = _run_with_prefect(runs, settings, args.force, server)
    if args.json:
        from tuneval.tracking.record import write_json

        write_json(results, args.json)
    print(results_table(results))
    from tuneval.tracking.record import summarize

    multi = [g for g in summarize(results) if len(g["seeds"]) > 1]
    if multi:
        print(summary_table(multi))
    failed = [r for r in results if r.get("status") != "completed"]
    for r in failed:
        where = (
            f"{r.get('pipeline')}/{r.get('model')}/{r.get('benchmark')}"
            if fan_out
            else f"{r.get('model')}/{r.get('benchmark')}"
        )
        print(f"error: {where}/seed {r.get('seed')}: {r.get('error')}", file=sys.stderr)
    return 2 if failed else 0


def _run_with_prefect(runs: list[Any], settings: Any, force: str | None, server: Any) -> list[dict[str, Any]]:
    from tuneval.flows.run_all import run_flow_on

    # Without a ready early server: the user's PREFECT_API_URL, or Prefect's own temporary server.
    return run_flow_on(server.api_url if server is not None and server.wait_ready() else None, runs, settings, force)
