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


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
def test_ui_links_the_runs_table_serves_the_run_and_sigterm_frees_the_port(project: Path) -> None:
    import threading

    from tuneval.cli.main import main

    out = project / "r.json"
    assert main(["run", "--config", str(project / "pipelines.yaml"), "--json", str(out)]) == 0
    run_id = json.loads(out.read_text())["runs"][0]["mlflow_run_id"]

    port = free_port()
    opener, opened = project / "browser.sh", project / "opened.txt"  # $BROWSER: what webbrowser runs
    opener.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    opener.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneval.cli", "ui", "--config", str(project / "pipelines.yaml"), "--port", str(port)]
        + ["--open"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "BROWSER": str(opener)},
    )
    lines: list[str] = []  # read all along: MLflow's logs would otherwise fill the pipe and block it
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    server_groups: list[int] = []
    try:
        deadline = time.time() + 120
        while not any(x.startswith("  smoke: http") for x in list(lines)):
            assert time.time() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.5)
        [link] = [x.split(": ", 1)[1].strip() for x in lines if x.startswith("  smoke: ")]
        server_groups = [os.getpgid(c) for c in children_of(proc.pid)]
        assert server_groups and all(g != os.getpgid(proc.pid) for g in server_groups)  # its own group

        exps = _post(f"{base}/experiments/search", {"max_results": 50})["experiments"]
        [exp] = [e for e in exps if e["name"] == "smoke"]
        query = "workflowType=machine_learning&viewStateShareKey=tuneval"
        assert link == f"http://127.0.0.1:{port}/#/experiments/{exp['experiment_id']}/runs?{query}"
        deadline = time.time() + 30
        while not opened.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert opened.read_text().strip() == link  # --open: that URL in the browser
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development" and "mlflow.sharedViewState.tuneval" in tags
        found = _post(f"{base}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert run_id in [r["info"]["run_id"] for r in found]
        arts = json.loads(urllib.request.urlopen(f"{base}/artifacts/list?run_id={run_id}", timeout=10).read())
        assert "predictions" in {f["path"] for f in arts.get("files", [])}

        start = time.time()
        proc.send_signal(signal.SIGTERM)  # to tuneval alone, as a service manager would
        assert proc.wait(timeout=60) == 0
        print(f"ui stopped in {time.time() - start:.1f} s")
        assert not any(group_alive(g) for g in server_groups)  # no worker left behind
        assert not listening(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for g in server_groups:
            if group_alive(g):
                os.killpg(g, signal.SIGKILL)


def test_ui_bad_input_is_one_line(project: Path, tmp_path: Path) -> None:
    cfg = str(project / "pipelines.yaml")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert_user_error(tuneval("ui", "--config", cfg, "--port", port), f"--port {port}", "already in use")
    missing = tmp_path / "nowhere" / "mlflow.db"
    proc = tuneval(
        "ui", "--config", cfg, "--port", str(free_port()), env={"MLFLOW_TRACKING_URI": f"sqlite:///{missing}"}
    )
    assert_user_error(proc, str(missing), "does not exist", "tuneval run")
    assert not missing.parent.exists()  # nothing created
    assert_user_error(tuneval("ui", "--config", cfg, "--port", "70000"), "--port 70000", "1 to 65535")
    with open(cfg, "a") as f:
        f.write("tracking: {log_models: maybe}\n")
    proc = tuneval("check", "--config", cfg)
    assert_user_error(proc, "pipelines.yaml:", "tracking.log_models", "true or false")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_servers_bind_to_loopback_by_default() -> None:
    from tuneval.cli.main import parser as _parser

    assert _parser().parse_args(["ui"]).host == "127.0.0.1"


def test_config_is_read_with_safe_load(tmp_path: Path) -> None:
    evil = tmp_path / "pipelines.yaml"
    evil.write_text(f"models: !!python/object/apply:os.system ['echo pwned > {tmp_path}/pwned']\n")
    assert_user_error(tuneval("check", "--config", str(evil)), "YAML")
    assert not (tmp_path / "pwned").exists()


def test_the_executable_exits_with_an_idle_thread_pool_left_to_the_garbage_collector() -> None:
    # MLflow's artifact repositories (logging a model) hold a thread pool in a reference cycle.
    script = """
import gc
from concurrent.futures import ThreadPoolExecutor
import tuneval.cli.main as m
class Repo:
    def __init__(self):
        self.pool, self.me = ThreadPoolExecutor(2), self
Repo().pool.submit(print, "work done")
gc.disable()
m.main = lambda argv=None: 0
m.entry()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "work done" in proc.stdout
