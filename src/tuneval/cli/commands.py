"""The small commands: check, list, schema, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REGRESSION_EXIT = 3  # distinct from 1 (a bug in tuneval) and 2 (a problem with the input)


def cmd_check(args: argparse.Namespace) -> int:
    from tuneval.config import load_config

    loaded = load_config(args.config)
    n = len(loaded.config.pipelines)
    print(
        f"{loaded.path}: OK ({len(loaded.config.models)} models, {len(loaded.config.benchmarks)} benchmarks, "
        f"{n} pipelines)"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tuneval.config import load_config

    cfg = load_config(args.config).config
    print("pipelines:")
    for name, p in cfg.pipelines.items():
        runs = len(p.models) * len(p.benchmarks) * len(p.seeds)
        print(
            f"  {name:<22} models={','.join(p.models)} benchmarks={','.join(p.benchmarks)} "
            f"seeds={','.join(map(str, p.seeds))} ({runs} runs)"
        )
    print("models:")
    for name, m in cfg.models.items():
        print(f"  {name:<22} {m.source}")
    print("benchmarks:")
    for name, b in cfg.benchmarks.items():
        src = f"hub:{b.data.hub}{'/' + b.data.subset if b.data.subset else ''}" if b.data.hub else "files"
        print(f"  {name:<22} {b.problem:<15} {src:<18} metrics={','.join(b.metrics)}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from tuneval.config.schema import Config

    print(json.dumps(Config.model_json_schema(), indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuneval.config import load_config
    from tuneval.config.runs import select_pipelines
    from tuneval.reporting.publish import publish, tracked_pipelines
    from tuneval.settings import Settings

    loaded = load_config(args.config)
    settings = Settings.from_env(loaded.root)
    names = select_pipelines(loaded, args.pipelines)
    if not args.pipelines:
        names = tracked_pipelines(settings, names)
    out = Path(args.out) if args.out else Path("reports")
    done = publish(settings, names, out, args.history)
    regressions = []
    for report, paths in done:
        from tuneval.reporting.render import markdown

        print(markdown(report, chart=None))
        print(f"wrote {', '.join(str(p) for p in paths)}\n")
        regressions += [(report.pipeline, c) for c in report.regressions]
    for pipeline, c in regressions:
        print(
            f"regression: {pipeline}: {c.model}/{c.benchmark}/{c.metric}: worse by {c.worse_by:.4g} "
            f"(threshold {c.threshold:.4g})",
            file=sys.stderr,
        )
    return REGRESSION_EXIT if regressions and args.fail_on_regression else 0
