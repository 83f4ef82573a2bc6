"""The ``tuneval`` command. Heavy imports (torch, prefect, mlflow) happen inside commands, so
``tuneval --help`` and ``tuneval check`` stay quick."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from tuneval import __version__
from tuneval.errors import TunevalError

REGRESSION_EXIT = 3  # distinct from 1 (a bug in tuneval) and 2 (a problem with the input)
STAGES = ("load", "prepare", "intrinsic", "finetune", "predict", "score")

# Quiet, offline-friendly defaults; any of them can be overridden from the environment.
ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except TunevalError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``tuneval`` executable: ``main``, then exit without the interpreter's teardown.

    Freeing torch's, transformers', MLflow's and Prefect's module state at exit took 3.3 s of a
    demo run (measured: wall time after ``main`` returned, 3.3 s vs 0.14 s with this), and nothing
    in it matters once the atexit handlers (early server stop, MLflow, logging) have run and the
    streams are flushed: artifacts are written and renamed before stages return. ``main`` itself
    returns normally, for callers in-process (tests).
    """
    code = main()
    import atexit
    import threading

    for t in threading.enumerate():  # what the interpreter's own exit would wait for
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`tuneval ... | head`): nothing left to write to
            pass
    os._exit(code)


def summary_table(groups: list[dict[str, Any]]) -> str:
    """Mean and 95% t-interval over seeds, one line per pipeline x model x benchmark x metric."""
    lines = ["", "over seeds (mean [95% CI], t-interval):"]
    for g in groups:
        for name, s in g["metrics"].items():
            ci = f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]" if s["ci_low"] is not None else "(one seed)"
            lines.append(
                f"  {g['pipeline']}  {g['model']}  {g['benchmark']}  {name}: {s['mean']:.4f} {ci}  "
                f"std {s['std']:.4f}  n={s['n']}"
            )
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        default="pipelines.yaml",
        metavar="PATH",
        help="pipelines file (default: ./pipelines.yaml); relative data paths start at its folder",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="show INFO logs (Prefect, tuneval)")
    p = _Parser(
        prog="tuneval",
        parents=[common],
        description="Fine-tune and score pre-trained language models, cached and tracked.",
    )
    p.add_argument("--version", action="version", version=f"tuneval {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", parents=[common], help="validate the config: every error at once")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("run", parents=[common], help="run pipelines (all when none named)")
    r.add_argument("pipelines", nargs="*", metavar="PIPELINE")
    r.add_argument("--force", choices=STAGES, metavar="STAGE", help=f"rerun STAGE and later ones ({', '.join(STAGES)})")
    r.add_argument("--json", metavar="PATH", help="write machine-readable results to PATH")
    r.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    r.add_argument(
        "--always-flow",
        action="store_true",
        help="run through Prefect even when every stage is cached (by default such a run is only recorded)",
    )
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", parents=[common], help="leaderboard from MLflow, regressions since the last run")
    rep.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="(default: every pipeline with tracked runs)")
    rep.add_argument("--out", metavar="DIR", help="write DIR/<pipeline>/report.{md,html,png} (default: ./reports)")
    rep.add_argument(
        "--fail-on-regression",
        action="store_true",
        help=f"exit {REGRESSION_EXIT} when a metric dropped beyond its CI since the previous run",
    )
    rep.set_defaults(func=cmd_report)

    u = sub.add_parser("ui", parents=[common], help="MLflow UI on the project's store (127.0.0.1)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    u.set_defaults(func=cmd_ui)

    for name, helptext in (
        ("serve", "serve scheduled pipelines here on their cron (Prefect serve)"),
        ("deploy", "register scheduled pipelines on a Prefect work pool, for workers elsewhere"),
    ):
        d = sub.add_parser(name, parents=[common], help=helptext)
        d.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="scheduled pipelines (all when none named)")
        d.add_argument("--name-prefix", default="", metavar="TEXT", help="prefix for the deployment names")
        d.add_argument("--dry-run", action="store_true", help="print the deployments as JSON and stop")
        d.set_defaults(func=cmd_serve if name == "serve" else cmd_deploy)
        if name == "serve":
            d.add_argument(
                "--port",
                type=int,
                default=4200,
                help="port of the Prefect server started when PREFECT_API_URL is unset",
            )
        else:
            d.add_argument("--pool", required=True, metavar="NAME", help="Prefect work pool (e.g. of type process)")
            d.add_argument(
                "--source",
                metavar="DIR|GIT_URL",
                help="where workers get the project: a folder they share (default: the config's folder) or a git URL",
            )

    sub.add_parser("list", parents=[common], help="pipelines, models and benchmarks declared").set_defaults(
        func=cmd_list
    )
    sub.add_parser("schema", parents=[common], help="print the config's JSON Schema").set_defaults(func=cmd_schema)
    return p


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


def cmd_run(args: argparse.Namespace) -> int:
    from tuneval.config import load_config, resolve_runs
    from tuneval.settings import Settings

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise TunevalError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist; create it")
    loaded = load_config(args.config)
    runs = resolve_runs(loaded, args.pipelines)  # every check that needs no model, before any flow starts
    settings = Settings.from_env(loaded.root, track=not args.no_track)
    from tuneval import runner

    # Nothing to build: record the runs (MLflow, JSON, table) with the plain stage functions and
    # skip Prefect, whose server start-up would be most of the time. --always-flow overrides.
    cached = not args.always_flow and runner.all_cached(runs, settings, args.force)
    server = None
    if not cached and not os.environ.get("PREFECT_API_URL"):
        from flows.ephemeral_server import early_server

        server = early_server()  # starts while MLflow and Prefect import below
    if settings.track:
        from tuneval.tracking import Tracker

        Tracker(settings.tracking_uri, settings.artifact_root).check()
    if cached:
        results = runner.run_groups(runs, settings, runner.run_plain)
    else:
        results = _run_with_prefect(runs, settings, args.force, server)
    if args.json:
        from tuneval.record import write_json

        write_json(results, args.json)
    print(results_table(results))
    from tuneval.record import summarize

    multi = [g for g in summarize(results) if len(g["seeds"]) > 1]
    if multi:
        print(summary_table(multi))
    failed = [r for r in results if r.get("status") != "completed"]
    for r in failed:
        print(f"error: {r.get('model')}/{r.get('benchmark')}/seed {r.get('seed')}: {r.get('error')}", file=sys.stderr)
    return 2 if failed else 0


def _run_with_prefect(runs: list[Any], settings: Any, force: str | None, server: Any) -> list[dict[str, Any]]:
    from flows.run_all import run_flow_on

    # Without a ready early server: the user's PREFECT_API_URL, or Prefect's own temporary server.
    return run_flow_on(server.api_url if server is not None and server.wait_ready() else None, runs, settings, force)


def cmd_report(args: argparse.Namespace) -> int:
    from tuneval.config import load_config
    from tuneval.config.runs import select_pipelines
    from tuneval.leaderboard import publish, tracked_pipelines
    from tuneval.settings import Settings

    loaded = load_config(args.config)
    settings = Settings.from_env(loaded.root)
    names = select_pipelines(loaded, args.pipelines)
    if not args.pipelines:
        names = tracked_pipelines(settings, names)
    out = Path(args.out) if args.out else Path("reports")
    done = publish(settings, names, out)
    regressions = []
    for report, paths in done:
        from tuneval.report import markdown

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


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneval.config import load_config

    loaded = load_config(args.config)
    from flows.deployments import plan, serve

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
    from flows.deployments import config_parameter, deploy, is_remote, plan

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


def cmd_ui(args: argparse.Namespace) -> int:
    from tuneval.config import load_config
    from tuneval.settings import Settings

    loaded = load_config(args.config)
    settings = Settings.from_env(loaded.root)
    if not settings.tracking_uri.startswith("sqlite:"):
        print(f"MLflow tracking server: {settings.tracking_uri} (open it in a browser)")
        return 0
    Path(settings.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.tracking_uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if settings.artifact_root:
        cmd += ["--default-artifact-root", settings.artifact_root]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def results_table(results: list[dict[str, Any]]) -> str:
    metric_names = sorted({k for r in results for k in (r.get("metrics") or {})})
    head = ["pipeline", "model", "benchmark", "seed", "status", "stages", *metric_names]
    rows = [head]
    for r in results:
        stages = " ".join(f"{s[:4]}:{v['status'][:3]}" for s, v in (r.get("stages") or {}).items())
        rows.append(
            [
                str(r.get("pipeline", "")),
                str(r.get("model", "")),
                str(r.get("benchmark", "")),
                str(r.get("seed", "")),
                str(r.get("status", "")),
                stages,
                *[f"{r['metrics'][m]:.4f}" if m in (r.get("metrics") or {}) else "-" for m in metric_names],
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    entry()
