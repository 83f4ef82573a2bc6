"""The command line as a user meets it: exit codes, one-line errors, no tracebacks, the UI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tuneval(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 120):
    return subprocess.run(
        [sys.executable, "-m", "tuneval.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def assert_user_error(proc, *parts: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines and all(x.startswith("error: ") for x in lines), proc.stderr
    for part in parts:
        assert part in proc.stderr, (part, proc.stderr)


def test_help_and_check_on_the_shipped_config() -> None:
    assert tuneval("--help").returncode == 0
    proc = tuneval("check", cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout
    listing = tuneval("list", cwd=ROOT)
    assert "demo" in listing.stdout and "rotten-tomatoes" in listing.stdout and "glue-sst2" in listing.stdout


def test_missing_config(tmp_path: Path) -> None:
    assert_user_error(tuneval("check", "--config", str(tmp_path / "x.yaml")), "config file not found")


def test_yaml_syntax_error(project: Path) -> None:
    (project / "pipelines.yaml").write_text("models: [unclosed\n")
    assert_user_error(
        tuneval("run", "--config", str(project / "pipelines.yaml")), "YAML syntax error", "pipelines.yaml:2"
    )


def test_several_config_errors_one_line_each(project: Path) -> None:
    cfg = project / "pipelines.yaml"
    cfg.write_text(cfg.read_text().replace("epochs: 2", "epochs: 0, lr: 1").replace("[tiny]", "[nope]"))
    proc = tuneval("check", "--config", str(cfg))
    assert_user_error(proc, "train.epochs", "train.lr", "unknown model 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 3


def test_unknown_pipeline_name(project: Path) -> None:
    assert_user_error(
        tuneval("run", "nosuch", "--config", str(project / "pipelines.yaml")), "no pipeline named 'nosuch'"
    )


def test_model_path_not_a_model(project: Path) -> None:
    cfg = project / "pipelines.yaml"
    cfg.write_text(cfg.read_text().replace("./models/bert", "./data"))
    assert_user_error(tuneval("run", "--config", str(cfg)), "models.tiny.source", "no config.json")


def test_unreachable_tracking_server_fails_before_training(project: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    start = time.time()
    proc = tuneval(
        "run", "--config", str(project / "pipelines.yaml"), env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    )
    assert_user_error(proc, "cannot be reached", "--no-track")
    assert time.time() - start < 60
    assert not (project / ".tuneval").exists()  # nothing ran


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.integration
def test_ui_serves_the_run_over_rest(project: Path) -> None:
    from tuneval.cli.main import main

    out = project / "r.json"
    assert main(["run", "--config", str(project / "pipelines.yaml"), "--json", str(out)]) == 0
    run_id = json.loads(out.read_text())["runs"][0]["mlflow_run_id"]

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneval.cli", "ui", "--config", str(project / "pipelines.yaml"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.time() + 90
        while True:
            try:
                exps = _post(f"{base}/experiments/search", {"max_results": 50})
                break
            except OSError as e:
                if time.time() > deadline or proc.poll() is not None:
                    output = proc.stdout.read().decode() if proc.poll() is not None else "UI not up"
                    raise AssertionError(output) from e
                time.sleep(1)
        ids = [e["experiment_id"] for e in exps["experiments"] if e["name"] == "smoke"]
        found = _post(f"{base}/runs/search", {"experiment_ids": ids})["runs"]
        assert run_id in [r["info"]["run_id"] for r in found]
        arts = json.loads(urllib.request.urlopen(f"{base}/artifacts/list?run_id={run_id}", timeout=10).read())
        assert "predictions" in {f["path"] for f in arts.get("files", [])}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_servers_bind_to_loopback_by_default() -> None:
    from tuneval.cli.main import parser as _parser

    assert _parser().parse_args(["ui"]).host == "127.0.0.1"


def test_config_is_read_with_safe_load(tmp_path: Path) -> None:
    evil = tmp_path / "pipelines.yaml"
    evil.write_text(f"models: !!python/object/apply:os.system ['echo pwned > {tmp_path}/pwned']\n")
    assert_user_error(tuneval("check", "--config", str(evil)), "YAML")
    assert not (tmp_path / "pwned").exists()
