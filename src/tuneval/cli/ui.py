"""`tuneval ui`: the MLflow UI on the project's store."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


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
