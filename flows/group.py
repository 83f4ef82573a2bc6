"""The dispatch unit: one seed group as one flow run, taken by a worker of a work pool.

Deployment ``tuneval-group/<pool>``: its flow takes plain parameters (config location, pipeline,
model, benchmark, seeds, force, and the invocation id so every worker of one ``tuneval run`` tags
the same invocation), re-reads and re-validates pipelines.yaml where it runs, and runs the group
exactly as a local run does (``runner.run_group``: parent MLflow run, fused seeds, one subflow per
seed). It leaves its results and a heartbeat in the shared cache (``pipeline.groups``); the
dispatcher (``flows/dispatch.py``) reads them and flags regressions once for the invocation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from tuneval.flows import user_errors
from tuneval.flows.pipeline_run import TASKS, pipeline_run_flow

from tuneval.errors import TunevalError
from tuneval.pipeline import groups
from tuneval.pipeline.runner import run_group

FLOW_NAME = "tuneval-group"
ENTRYPOINT = "tuneval.flows.group.group_flow"  # a module path: workers import the installed tuneval

user_errors.install()


@flow(
    name=FLOW_NAME,
    flow_run_name="{pipeline}/{model}/{benchmark}",
    persist_result=False,
    validate_parameters=True,
)
def group_flow(
    config: str,
    pipeline: str,
    model: str,
    benchmark: str,
    seeds: list[int],
    invocation: str,
    force: str | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Run one seed group; FAILED when any of its runs failed (its results are written either way)."""
    from tuneval.config import load_config, resolve_runs
    from tuneval.pipeline.keys import ORDER
    from tuneval.settings import Settings

    if force is not None and force not in ORDER:
        raise TunevalError(f"parameter force: unknown stage {force!r}; use one of {', '.join(ORDER)}")
    ref = groups.GroupRef(pipeline, model, benchmark, tuple(seeds))
    loaded = load_config(config)  # the worker's own validation: nothing pickled travels
    runs = groups.select(resolve_runs(loaded, [pipeline]), ref)
    settings = dataclasses.replace(Settings.from_env(loaded.root, track=track), invocation=invocation)
    tracker = None
    if settings.track:
        from tuneval.tracking.client import Tracker
        from tuneval.tracking.queries import supersede

        tracker = Tracker(settings.tracking_uri, settings.artifact_root)
        tracker.check()
        # An earlier attempt of this group (its worker crashed) left RUNNING MLflow runs: close them.
        supersede(tracker, pipeline, model, benchmark, invocation)
    attempt = {"flow_run_id": str(flow_run.get_id() or ""), "attempt": flow_run.run_count or 1}
    place = {**groups.where(), **attempt}
    started = time.time()
    with groups.heartbeat(groups.beat_path(settings, ref), attempt):
        results = run_group(runs, settings, pipeline_run_flow, force, TASKS)
        for r in results:
            r["worker"] = place
            if tracker is not None and r.get("mlflow_run_id"):
                tracker.set_tags(
                    r["mlflow_run_id"],
                    {
                        "tuneval.worker.host": place["host"],
                        "tuneval.worker.cuda_visible_devices": str(place["cuda_visible_devices"]),
                        "prefect.group_flow_run_id": attempt["flow_run_id"],
                    },
                )
        path = groups.write_result(settings, ref, results, {"worker": place, "started": started, "ended": time.time()})
    failed = [r for r in results if r.get("status") != "completed"]
    if failed:
        first = str(failed[0].get("error") or "").splitlines()[:1] or ["failed"]
        raise TunevalError(f"group {ref.name}: {len(failed)} of {len(results)} runs failed: {first[0][:300]}")
    return {"results": str(path), "completed": len(results)}


def ensure_deployment(pool: str, source: str, command: str | None = None) -> str:
    """Register (or update) ``tuneval-group/<pool>`` on work pool ``pool``; its runs work in ``source``
    (the project folder every worker reaches at the same path, or a git URL). Returns its name.

    ``command``: the process workers' command for each run instead of Prefect's default launcher
    (a supervisor process that resolves the workspace in another process, then starts the engine):
    ``<python> -m prefect.engine`` starts one process instead of three, about 2 s less per group
    here, but names one interpreter, so only workers that share it (``--workers``) get it."""
    from prefect import deploy as prefect_deploy
    from prefect.deployments.runner import EntrypointType

    remote = group_flow.from_source(source=source, entrypoint=ENTRYPOINT)
    deployment = remote.to_deployment(
        name=pool,
        description="tuneval: one seed group (pipeline x model x benchmark with its seeds)",
        tags=["tuneval"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"command": command} if command else None,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its table of deployments would precede our results
        prefect_deploy(
            deployment,
            work_pool_name=pool,
            build=False,
            push=False,
            print_next_steps_message=False,
            ignore_warnings=True,
        )
    return f"{FLOW_NAME}/{pool}"
