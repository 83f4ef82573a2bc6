"""The ``tuneval`` command: argument parsing and the exit-code rules. Each command lives in its
own module and does its heavy imports (torch, prefect, mlflow) inside, so ``tuneval --help`` and
``tuneval check`` stay quick."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from tuneval import __version__
from tuneval.cli import commands, dispatch, run, schedule, ui, worker
from tuneval.errors import TunevalError

# pipeline.keys.ORDER, written out: `tuneval --help` imports no config code (a test compares them).
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
    args = parser().parse_args(argv)
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

    # What the interpreter's own exit does first: the exit hooks registered with threading, e.g.
    # concurrent.futures stopping idle pool workers. Without them, the workers of an executor left
    # to the garbage collector (MLflow's artifact repositories, when a model is logged) wait for
    # work forever and the join below never returns.
    for hook in reversed(getattr(threading, "_threading_atexits", [])):
        hook()
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


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def parser() -> argparse.ArgumentParser:
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
    c.set_defaults(func=commands.cmd_check)

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
    fan = r.add_argument_group("fan-out (seed groups run in parallel on Prefect workers)")
    fan.add_argument(
        "--pool", metavar="NAME", help="dispatch each seed group to work pool NAME (PREFECT_API_URL's server)"
    )
    fan.add_argument(
        "--workers",
        type=dispatch.workers_arg,
        metavar="N|auto",
        help="start N local workers (auto: one per visible GPU), worker i on GPU i; stopped when done",
    )
    fan.add_argument(
        "--retries", type=dispatch.count_arg, default=2, metavar="N", help="re-queue a crashed group up to N times (2)"
    )
    fan.add_argument("--invocation", metavar="ID", help="with --pool: wait again for an invocation already submitted")
    r.set_defaults(func=run.cmd_run)

    rep = sub.add_parser("report", parents=[common], help="leaderboard from MLflow, regressions since the last run")
    rep.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="(default: every pipeline with tracked runs)")
    rep.add_argument("--out", metavar="DIR", help="write DIR/<pipeline>/report.{md,html,png} (default: ./reports)")
    rep.add_argument(
        "--fail-on-regression",
        action="store_true",
        help=f"exit {commands.REGRESSION_EXIT} when a metric dropped beyond its CI since the previous run",
    )
    rep.add_argument(
        "--history", type=dispatch.count_arg, default=10, metavar="K", help="invocations on the trend chart (10)"
    )
    rep.set_defaults(func=commands.cmd_report)

    u = sub.add_parser("ui", parents=[common], help="MLflow UI on the project's store (127.0.0.1)")
    u.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="pipelines to link (all when none named)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    u.add_argument("--open", action="store_true", help="open the first pipeline's runs table in the browser")
    u.set_defaults(func=ui.cmd_ui)

    for name, helptext in (
        ("serve", "serve scheduled pipelines here on their cron (Prefect serve)"),
        ("deploy", "register scheduled pipelines on a Prefect work pool, for workers elsewhere"),
    ):
        d = sub.add_parser(name, parents=[common], help=helptext)
        d.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="scheduled pipelines (all when none named)")
        d.add_argument("--name-prefix", default="", metavar="TEXT", help="prefix for the deployment names")
        d.add_argument("--dry-run", action="store_true", help="print the deployments as JSON and stop")
        d.set_defaults(func=schedule.cmd_serve if name == "serve" else schedule.cmd_deploy)
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

    w = sub.add_parser("worker", parents=[common], help="Prefect process workers on this machine, one per GPU")
    w.add_argument("--pool", required=True, metavar="NAME", help="work pool to take seed groups from")
    w.add_argument(
        "--gpus",
        type=worker.gpus_arg,
        metavar="0,1,...",
        help="GPU ids, one worker each (default: every visible GPU; none visible: one CPU worker)",
    )
    w.set_defaults(func=worker.cmd_worker)

    sub.add_parser("list", parents=[common], help="pipelines, models and benchmarks declared").set_defaults(
        func=commands.cmd_list
    )
    schema = sub.add_parser("schema", parents=[common], help="print the config's JSON Schema")
    schema.set_defaults(func=commands.cmd_schema)
    return p
