"""Scheduled pipelines as Prefect deployments, one per pipeline with a ``schedule:``.

``tuneval serve`` serves them from this process (Prefect ``serve``); ``tuneval deploy`` registers
them on a work pool, so workers on other machines run them against a Prefect server. The deployed
flow takes plain strings (config path, pipeline, force) and re-reads and re-validates
pipelines.yaml where it runs, so a deployment never carries a stale, pickled config."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tuneval.config.load import LoadedConfig
from tuneval.config.runs import select_pipelines
from tuneval.errors import ConfigError, TunevalError

FLOW_NAME = "tuneval-pipeline"
# A module path, not a file path: a worker imports the installed tuneval (or the checkout it runs in).
ENTRYPOINT = "tuneval.flows.deployments.pipeline_flow"
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]{0,40}$")


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=True)
def pipeline_flow(config: str, pipeline: str, force: str | None = None) -> list[dict[str, Any]]:
    """Run one pipeline of ``config`` (a path, relative to the deployment's working directory).

    Ends FAILED when any of its runs failed, so the Prefect UI shows what the MLflow runs say."""
    from tuneval.flows.run_all import run_flow

    from tuneval.config import load_config, resolve_runs
    from tuneval.pipeline.keys import ORDER
    from tuneval.settings import Settings
    from tuneval.tracking.client import Tracker

    if force is not None and force not in ORDER:
        raise TunevalError(f"parameter force: unknown stage {force!r}; use one of {', '.join(ORDER)}")
    loaded = load_config(config)
    runs = resolve_runs(loaded, [pipeline])
    settings = Settings.from_env(loaded.root)
    Tracker(settings.tracking_uri, settings.artifact_root).check()
    dispatch = loaded.config.pipelines[pipeline].dispatch
    if dispatch is None:
        results = run_flow(runs, settings, force)
    else:  # `dispatch: {pool: NAME}`: the seed groups fan out over that pool, as `tuneval run --pool` does
        from tuneval.flows.dispatch import Dispatch, dispatch_flow

        from tuneval.pipeline.groups import groups_of, lost_after_seconds

        check_pool(dispatch.pool)
        source = str(loaded.root)
        how = Dispatch(dispatch.pool, config_parameter(loaded.path, source), source, lost_after=lost_after_seconds())
        results = dispatch_flow(groups_of(runs), settings, force, how)
    failed = [r for r in results if r.get("status") != "completed"]
    if failed:
        log = get_run_logger()
        for r in failed:
            log.error("%s/%s/seed %s failed: %s", r.get("model"), r.get("benchmark"), r.get("seed"), r.get("error"))
        raise TunevalError(f"pipeline {pipeline}: {len(failed)} of {len(results)} runs failed")
    return results


@dataclass(frozen=True)
class Planned:
    """One deployment to create: what ``--dry-run`` prints."""

    deployment: str  # "<flow>/<name>", as `prefect deployment run` takes it
    name: str
    pipeline: str
    cron: str
    timezone: str
    parameters: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan(loaded: LoadedConfig, names: list[str], prefix: str, config_param: str) -> list[Planned]:
    """The deployments for the named pipelines (all scheduled ones when none named).

    A named pipeline without a schedule, or no scheduled pipeline at all, is a user error."""
    if not _PREFIX.match(prefix):
        raise TunevalError(f"--name-prefix {prefix!r}: use at most 40 letters, digits, '_', '.' or '-'")
    pipelines = loaded.config.pipelines
    selected = select_pipelines(loaded, names)
    unscheduled = [n for n in names if pipelines[n].schedule is None]
    if unscheduled:
        raise ConfigError(
            [
                f'{loaded.path}: pipelines.{n}: no schedule; add `schedule: {{cron: "0 3 * * 1", timezone: UTC}}`'
                for n in unscheduled
            ]
        )
    out = []
    for name in selected:
        sched = pipelines[name].schedule
        if sched is None:
            continue
        out.append(
            Planned(
                deployment=f"{FLOW_NAME}/{prefix}{name}",
                name=f"{prefix}{name}",
                pipeline=name,
                cron=sched.cron,
                timezone=sched.timezone,
                parameters={"config": config_param, "pipeline": name},
            )
        )
    if not out:
        raise ConfigError(
            [
                f"{loaded.path}: pipelines: none has a schedule; add "
                f'`schedule: {{cron: "0 3 * * 1", timezone: UTC}}` to the pipelines to serve or deploy'
            ]
        )
    return out


def _to_deployment(source_flow: Any, p: Planned) -> Any:
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    return source_flow.to_deployment(
        name=p.name,
        schedules=[Cron(p.cron, timezone=p.timezone)],
        parameters=p.parameters,
        description=f"tuneval pipeline {p.pipeline} ({p.cron}, {p.timezone})",
        tags=["tuneval"],
        entrypoint_type=EntrypointType.MODULE_PATH,  # ignored for a flow from_source: its entrypoint is ours
    )


def serve(planned: list[Planned], port: int) -> None:
    """Serve the deployments from this process until interrupted (Prefect pauses their schedules on exit).

    Without PREFECT_API_URL a Prefect server is started on 127.0.0.1:port for as long as this runs:
    the embedded server would accept the schedules but never fire them (it runs no scheduler)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tuneval.flows.local_server import start_server

    deployments = [_to_deployment(pipeline_flow, p) for p in planned]
    if PREFECT_API_URL.value():
        prefect_serve(*deployments)
        return
    server = start_server(port)
    print(
        f"Prefect server (scheduler and UI) on {server.api_url.removesuffix('/api')}; log in {server.log}", flush=True
    )
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            prefect_serve(*deployments)
    finally:
        server.stop()


def deploy(planned: list[Planned], pool: str, source: str) -> list[str]:
    """Register the deployments on work pool ``pool``; workers pull ``source`` (a folder or git URL)."""
    from prefect import deploy as prefect_deploy

    check_pool(pool)
    remote = pipeline_flow.from_source(source=source, entrypoint=ENTRYPOINT)
    deployments = [_to_deployment(remote, p) for p in planned]
    ids = prefect_deploy(
        *deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False, ignore_warnings=True
    )
    return [str(i) for i in ids]


def check_pool(pool: str) -> None:
    """A deployment on the ephemeral server or a missing pool would wait forever: say so now."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from tuneval.flows.local_server import reachable

    api = PREFECT_API_URL.value()
    if not api:
        raise TunevalError(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and export "
            "PREFECT_API_URL=http://HOST:4200/api on this machine and on the workers"
        )
    if not reachable(api):
        raise TunevalError(f"PREFECT_API_URL {api} cannot be reached; start `prefect server start` or fix the URL")
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise TunevalError(
                f"--pool {pool}: no such work pool on {api}; "
                f"create it with `prefect work-pool create {pool} --type process`"
            ) from None


def is_remote(source: str) -> bool:
    """A git URL (or another fsspec URL) rather than a folder: Prefect's own rule, minus file://."""
    return ("://" in source and not source.startswith("file://")) or source.endswith(".git")


def config_parameter(config: Path, source: str) -> str:
    """How the worker finds pipelines.yaml: relative to the source it pulls, else this absolute path."""
    if is_remote(source):
        try:
            top = subprocess.run(
                ["git", "rev-parse", "--show-toplevel"], cwd=config.parent, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            raise TunevalError(
                f"--source {source}: {config} is not inside a git checkout, so its path in the repository is unknown"
            ) from None
        return config.relative_to(Path(top).resolve()).as_posix()
    try:
        return config.relative_to(Path(source).resolve()).as_posix()
    except ValueError:
        return str(config)
