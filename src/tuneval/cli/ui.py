"""`tuneval ui`: the MLflow UI on the project's store, opening on each pipeline's runs table.

Before the server starts, every pipeline's experiment gets tuneval's saved view (sorted by the
primary test metric, which comes first; ``tracking.ui_view``) and the URL that opens on it is
printed (``--open``: in the default browser). The server runs as its own process group and
SIGINT / SIGTERM stop all of it (``ui_server``): the port is free afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from tuneval.cli import ui_server
from tuneval.errors import TunevalError

if TYPE_CHECKING:
    from tuneval.settings import Settings


def local_store(uri: str) -> Path | None:
    """The file behind a local tracking URI (sqlite database or file-store folder); None for a server."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def cmd_ui(args: argparse.Namespace) -> int:
    from tuneval.config import load_config, select_pipelines
    from tuneval.settings import Settings

    loaded = load_config(args.config)
    names = select_pipelines(loaded, args.pipelines)
    settings = Settings.from_env(loaded.root)
    store = local_store(settings.tracking_uri)
    if store is None:  # a tracking server: it serves the UI itself
        links = _links(settings, loaded.config, names, settings.tracking_uri)
        _print_links(f"MLflow tracking server: {settings.tracking_uri}", links)
        return _open(links) if args.open else 0
    if not 0 < args.port < 65536:
        raise TunevalError(f"--port {args.port}: not a TCP port; give a number from 1 to 65535")
    if ui_server.port_in_use(args.host, args.port):
        raise TunevalError(
            f"--port {args.port}: already in use on {args.host} (another `tuneval ui` or `mlflow ui`?); "
            "stop it or pass another --port"
        )
    if not store.exists():
        raise TunevalError(
            f"{store}: tracking store: does not exist; run `tuneval run` (or `make demo`) first, "
            "or point MLFLOW_TRACKING_URI at an existing store"
        )
    base = f"http://{args.host}:{args.port}"
    links = _links(settings, loaded.config, names, base)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", settings.tracking_uri]
    # One worker and no job runner (GenAI jobs: trace scoring, prompt optimisation): 2 processes
    # instead of 10 for one person's browser, and a start-up in seconds.
    cmd += ["--host", args.host, "--port", str(args.port), "--workers", "1"]
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if settings.artifact_root:
        cmd += ["--default-artifact-root", settings.artifact_root]
    proc = ui_server.start(cmd)
    code = 0
    with ui_server.stopping_on_signals(proc):
        if not ui_server.wait_ready(f"{base}/health", proc):
            raise TunevalError(f"mlflow ui did not start on {base} (exit code {proc.poll()}); see its output above")
        _print_links(f"MLflow UI on {base} (Ctrl-C stops it)", links)
        if args.open:
            _open(links)
        code = proc.wait()
    return code


def _links(settings: Settings, config: Any, names: list[str], base: str) -> list[tuple[str, str | None]]:
    from tuneval.tracking.client import Tracker
    from tuneval.tracking.ui_view import prepare

    tracker = Tracker(settings.tracking_uri, settings.artifact_root)
    tracker.check()  # a server that does not answer: one line, exit 2 (MLflow would retry for minutes)
    return prepare(tracker.client, config, names, base)


def _print_links(header: str, links: list[tuple[str, str | None]]) -> None:
    print(header)
    for name, url in links:
        print(f"  {name}: {url or 'no runs yet (tuneval run ' + name + ')'}")
    sys.stdout.flush()


def _open(links: list[tuple[str, str | None]]) -> int:
    url = next((u for _, u in links if u), None)
    if url is None:
        print("nothing to open: no pipeline has runs yet")
    elif not webbrowser.open(url):
        print(f"no browser found here; open {url}")
    return 0
