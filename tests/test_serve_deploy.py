"""Schedules: `tuneval serve`/`deploy` plan one deployment per scheduled pipeline, and a deployment
runs through a real Prefect server, process work pool and worker into MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = '    schedule: {cron: "30 4 * * 1-5", timezone: Europe/Berlin}\n'


def tuneval(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneval.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def scheduled(project: Path) -> Path:
    """The conftest project with a schedule on its `smoke` pipeline and an unscheduled second pipeline."""
    cfg = project / "pipelines.yaml"
    text = cfg.read_text().replace("  smoke:\n", "  smoke:\n" + SCHEDULE)
    cfg.write_text(text + "  adhoc:\n    models: [tiny]\n    benchmarks: [toy]\n")
    return cfg


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command in this process (a subprocess per case would cost seconds of imports each)."""
    from tuneval.cli.main import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_lists_one_deployment_per_scheduled_pipeline(project: Path, capsys) -> None:
    cfg = scheduled(project)
    code, out, err = cli(capsys, "serve", "--config", str(cfg), "--dry-run")
    assert code == 0, err
    [d] = json.loads(out)  # `adhoc` has no schedule: not served
    assert (d["deployment"], d["cron"], d["timezone"]) == ("tuneval-pipeline/smoke", "30 4 * * 1-5", "Europe/Berlin")
    assert d["parameters"] == {"config": str(cfg), "pipeline": "smoke"}

    # deploy: the worker finds the config relative to the source it pulls (the config's folder by default)
    code, out, err = cli(
        capsys, "deploy", "--pool", "gpu", "--name-prefix", "nightly-", "--config", str(cfg), "--dry-run"
    )
    [d] = json.loads(out)
    assert d["deployment"] == "tuneval-pipeline/nightly-smoke" and d["work_pool"] == "gpu"
    assert d["parameters"]["config"] == "pipelines.yaml" and d["source"] == str(project)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "adhoc"], "pipelines.adhoc: no schedule"),
        (["serve", "nosuch"], "no pipeline named 'nosuch'"),
        (["deploy", "--pool", "gpu", "--name-prefix", "a/b"], "--name-prefix"),
        (["deploy", "--pool", "gpu", "--source", "/nonexistent/dir"], "not a folder"),
    ],
)
def test_serve_and_deploy_user_errors(project: Path, capsys, args: list[str], message: str) -> None:
    code, _, err = cli(capsys, *args, "--config", str(scheduled(project)), "--dry-run")
    assert code == 2 and message in err and "Traceback" not in err, err


def test_no_scheduled_pipeline_is_a_user_error(project: Path) -> None:
    proc = tuneval("serve", "--config", str(project / "pipelines.yaml"))  # as a user meets it: no traceback
    assert proc.returncode == 2 and "none has a schedule" in proc.stderr and "Traceback" not in proc.stderr


def test_deploy_needs_a_reachable_server(project: Path, capsys) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tuneval.flows.local_server import free_port

    cfg = scheduled(project)
    code, _, err = cli(capsys, "deploy", "--pool", "gpu", "--config", str(cfg))
    assert code == 2 and "PREFECT_API_URL is not set" in err, err
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        code, _, err = cli(capsys, "deploy", "--pool", "gpu", "--config", str(cfg))
    assert code == 2 and "cannot be reached" in err, err


def test_git_source_takes_the_config_path_inside_the_repository(project: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(project.parent))  # never a repository around the tmp dir
    cfg = project / "evals" / "pipelines.yaml"  # one folder down in the repository
    cfg.parent.mkdir()
    cfg.write_text(scheduled(project).read_text().replace("./models/", "../models/").replace("data/", "../data/"))
    args = ("deploy", "--pool", "gpu", "--source", "https://example.com/team/evals.git", "--config", str(cfg))
    code, _, err = cli(capsys, *args, "--dry-run")
    assert code == 2 and "not inside a git checkout" in err, err
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    code, out, err = cli(capsys, *args, "--dry-run")
    assert code == 0, err
    assert json.loads(out)[0]["parameters"]["config"] == "evals/pipelines.yaml"


def test_deployed_flow_rejects_an_unknown_force_stage(project: Path) -> None:
    from tuneval.flows.deployments import pipeline_flow

    from tuneval.errors import TunevalError

    with pytest.raises(TunevalError, match="unknown stage 'fine-tune'"):
        pipeline_flow.fn(str(scheduled(project)), "smoke", force="fine-tune")


def _deployment(name: str, api_url: str, wait: float = 0) -> Any:
    """Read a deployment back from the server, waiting up to ``wait`` seconds for it to appear."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + wait
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


@pytest.mark.integration
def test_deployment_runs_on_a_worker_against_a_server(project: Path, tmp_path: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tuneval.flows.local_server import free_port, start_server, stop_group

    cfg = scheduled(project)
    env = {
        "PREFECT_HOME": str(tmp_path / "prefect-server"),
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # default 10: the worker would idle most of the test
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    server = start_server(free_port(), env, log=tmp_path / "server.log")
    env["PREFECT_API_URL"] = server.api_url
    full_env = {**os.environ, **env}
    started: list[subprocess.Popen[bytes]] = []

    def spawn(*cmd: str, log: str) -> subprocess.Popen[bytes]:
        out = (tmp_path / log).open("wb")
        started.append(
            subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )
        return started[-1]

    try:
        # `tuneval serve` registers its own deployment meanwhile (served from its process, no pool).
        serving = spawn(
            sys.executable,
            "-m",
            "tuneval.cli",
            "serve",
            "--name-prefix",
            "served-",
            "--config",
            str(cfg),
            log="serve.log",
        )
        pool = subprocess.run(
            [sys.executable, "-m", "prefect", "work-pool", "create", "tiny-pool", "--type", "process"],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pool.returncode == 0, pool.stdout + pool.stderr
        spawn(sys.executable, "-m", "prefect", "worker", "start", "--pool", "tiny-pool", log="worker.log")
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            code, _, err = cli(capsys, "deploy", "--pool", "no-such-pool", "--config", str(cfg))
        assert code == 2 and "prefect work-pool create no-such-pool" in err, err
        deployed = tuneval("deploy", "--pool", "tiny-pool", "--config", str(cfg), env=env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "tuneval-pipeline/smoke" in deployed.stdout

        with temporary_settings({PREFECT_API_URL: server.api_url}):
            flow_run = run_deployment("tuneval-pipeline/smoke", timeout=240, poll_interval=1)
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, log[-3000:])
        assert flow_run.parameters == {"config": "pipelines.yaml", "pipeline": "smoke"}
        deployment = _deployment("tuneval-pipeline/smoke", server.api_url)
        [sched] = deployment.schedules
        assert (sched.schedule.cron, sched.schedule.timezone) == ("30 4 * * 1-5", "Europe/Berlin")
        assert sched.active and deployment.work_pool_name == "tiny-pool"

        # The worker ran in the project (the deployment's source), so the default store is the project's.
        mlflow = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
        exp = mlflow.get_experiment_by_name("smoke")
        [run] = mlflow.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics

        served = _deployment("tuneval-pipeline/served-smoke", server.api_url, wait=60)
        assert [(s.schedule.cron, s.schedule.timezone) for s in served.schedules] == [("30 4 * * 1-5", "Europe/Berlin")]
        assert served.work_pool_name is None and serving.poll() is None  # still serving
    finally:
        for proc in started:
            stop_group(proc)
        server.stop()
    assert all(p.poll() is not None for p in [*started, server.proc])
