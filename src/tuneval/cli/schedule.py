"""`tuneval serve` and `tuneval deploy`: scheduled pipelines as Prefect deployments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneval.errors import TunevalError


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneval.config import load_config

    loaded = load_config(args.config)
    from tuneval.flows.deployments import plan, serve

    planned = plan(loaded, args.pipelines, args.name_prefix, str(loaded.path))
    if args.dry_run:
        print(json.dumps([p.to_json() for p in planned], indent=1))
        return 0
    for p in planned:
        print(f"serving {p.deployment}: cron {p.cron!r} ({p.timezone}); Ctrl-C stops", flush=True)
    serve(planned, args.port)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from tuneval.config import load_config

    loaded = load_config(args.config)
    from tuneval.flows.deployments import config_parameter, deploy, is_remote, plan

    source = args.source or str(loaded.root)
    if not is_remote(source):
        source = str(Path(source.removeprefix("file://")).expanduser().resolve())
        if not Path(source).is_dir():
            raise TunevalError(f"--source {args.source}: not a folder; give the project folder or a git URL")
    planned = plan(loaded, args.pipelines, args.name_prefix, config_parameter(loaded.path, source))
    if args.dry_run:
        print(json.dumps([{**p.to_json(), "work_pool": args.pool, "source": source} for p in planned], indent=1))
        return 0
    deploy(planned, args.pool, source)
    for p in planned:
        print(f"deployed {p.deployment} on pool {args.pool}: cron {p.cron!r} ({p.timezone}), source {source}")
    return 0
