"""The invocation's flow when seed groups fan out over a work pool.

Each group becomes a run of deployment ``tuneval-group/<pool>`` (``flows/group.py``), submitted with
``run_deployment(timeout=0, idempotency_key=<invocation>/<group>)``: submitting the same invocation
again returns the runs it already has instead of running them twice. Then it waits for all of
them (no time limit: a matrix of fine-tunes takes what it takes), polling their states:

- CRASHED (the worker reported its run's process killed, or we found the worker lost): re-queued
  as ``AwaitingRetry`` up to ``retries`` times; any worker of the pool takes it and its finetune
  stage resumes from the last checkpoint in the shared cache;
- RUNNING with a heartbeat (``pipeline.groups``) that stopped changing for ``lost_after`` seconds:
  nobody is left to report it (a machine, or a worker and its run, killed), so it is marked
  CRASHED here, then re-queued as above.

Results come back through the shared cache (each group's JSON, the same dicts a local run returns),
not through Prefect's pickled results; regressions are flagged once, for the whole invocation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import flow
from tuneval.flows import user_errors
from tuneval.flows.group import ensure_deployment

from tuneval.pipeline.groups import BeatWatch, GroupRef, beat_path, read_json, result_path
from tuneval.settings import Settings

log = logging.getLogger("tuneval.dispatch")
user_errors.install()

IDLE_WARNING_SECONDS = 60


@dataclass(frozen=True)
class Dispatch:
    """Where and how an invocation's groups run."""

    pool: str
    config: str  # pipelines.yaml as the workers find it (relative to ``source``, or absolute)
    source: str  # the deployment's working directory on the workers: the project folder or a git URL
    retries: int = 2  # re-queues of a crashed group
    lost_after: float = 60.0  # seconds without a heartbeat before a running group's worker counts as lost
    poll: float = 1.0
    command: str | None = None  # the workers' run command (group.ensure_deployment), None: Prefect's default


@flow(name="tuneval-dispatch", persist_result=False, validate_parameters=False)
def dispatch_flow(groups: list[GroupRef], settings: Settings, force: str | None, how: Dispatch) -> list[dict[str, Any]]:
    """Submit every group, wait for all, return their results in order; flag regressions once."""
    from tuneval.reporting.publish import flag_after_run

    deployment = ensure_deployment(how.pool, how.source, how.command)
    ids = {ref: submit(deployment, ref, settings, force, how.config) for ref in groups}
    finals = wait_all(ids, settings, how)
    results: list[dict[str, Any]] = []
    for ref in groups:
        results += collect(ref, finals[ref], settings)
    flag_after_run(settings, list(dict.fromkeys(ref.pipeline for ref in groups)))
    return results


def submit(deployment: str, ref: GroupRef, settings: Settings, force: str | None, config: str) -> UUID:
    from prefect.deployments import run_deployment

    parameters = {
        "config": config,
        "pipeline": ref.pipeline,
        "model": ref.model,
        "benchmark": ref.benchmark,
        "seeds": list(ref.seeds),
        "invocation": settings.invocation,
        "force": force,
        "track": settings.track,
    }
    run = run_deployment(
        deployment,
        parameters=parameters,
        timeout=0,  # returns at once; wait_all waits for every group together
        idempotency_key=f"{settings.invocation}/{ref.slug}",
        tags=["tuneval", f"tuneval-invocation:{settings.invocation}"],
    )
    return run.id


def wait_all(ids: dict[GroupRef, UUID], settings: Settings, how: Dispatch) -> dict[GroupRef, Any]:
    """Poll until every group's run is final (re-queueing crashed ones); returns each final FlowRun."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import AwaitingRetry, Crashed

    watch = BeatWatch(how.lost_after)
    requeued = dict.fromkeys(ids, 0)
    done: dict[GroupRef, Any] = {}
    running: dict[GroupRef, float] = {}  # when each was first seen running
    unseen: set[GroupRef] = set()  # warned: running without a heartbeat visible here
    start, warned = time.monotonic(), False
    with get_client(sync_client=True) as client:
        while len(done) < len(ids):
            pending = {i: ref for ref, i in ids.items() if ref not in done}
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))
            for run in client.read_flow_runs(flow_run_filter=flow_filter, limit=len(pending)):
                ref, state = pending[run.id], run.state
                if state is None:
                    continue
                if state.is_crashed() and requeued[ref] < how.retries:
                    requeued[ref] += 1
                    log.warning(
                        "%s crashed (%s); re-queued (retry %d of %d)",
                        ref.name,
                        state.message,
                        requeued[ref],
                        how.retries,
                    )
                    watch.forget(beat_path(settings, ref))
                    running.pop(ref, None)
                    client.set_flow_run_state(run.id, AwaitingRetry(message=f"tuneval: {state.message}"), force=True)
                elif state.is_final():
                    done[ref] = run
                elif state.is_running() and (beat := watch.lost(beat_path(settings, ref))) is None:
                    running.setdefault(ref, time.monotonic())
                    if not watch.ever_seen(beat_path(settings, ref)) and ref not in unseen:
                        if time.monotonic() - running[ref] > 2 * how.lost_after:
                            unseen.add(ref)
                            log.warning(
                                "%s runs, but its heartbeat %s never appeared here: a lost worker would go "
                                "unnoticed; point TUNEVAL_CACHE_DIR at the storage the workers share",
                                ref.name,
                                beat_path(settings, ref),
                            )
                elif state.is_running() and beat is not None:
                    message = (
                        f"worker lost: no heartbeat from {beat.get('host')} pid {beat.get('pid')} "
                        f"(CUDA_VISIBLE_DEVICES={beat.get('cuda_visible_devices')}) for {how.lost_after:.0f} s"
                    )
                    log.warning("%s: %s; marking it crashed", ref.name, message)
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            if not warned and time.monotonic() - start > IDLE_WARNING_SECONDS and len(done) < len(ids):
                warned = _warn_if_no_worker(client, how.pool)
            if len(done) < len(ids):
                time.sleep(how.poll)
    return done


def _warn_if_no_worker(client: Any, pool: str) -> bool:
    try:
        workers = client.read_workers_for_work_pool(pool)
    except Exception:  # noqa: BLE001 - a hint only
        return True
    if not any(str(getattr(w, "status", "")).upper().endswith("ONLINE") for w in workers):
        log.warning("no worker is online on pool %s: start one with `tuneval worker --pool %s`", pool, pool)
    return True


def collect(ref: GroupRef, run: Any, settings: Settings) -> list[dict[str, Any]]:
    """A group's results as its worker wrote them; when it wrote none, one failed result per seed
    saying why (the run's final state, or a cache this machine does not share)."""
    data = read_json(result_path(settings, ref))
    state = run.state
    where = {"flow_run_id": str(run.id), "state": state.type.value if state else None}
    if data is not None and data.get("invocation") == settings.invocation:
        out = []
        for seed, r in zip(ref.seeds, data["results"], strict=False):
            base = {"pipeline": ref.pipeline, "model": ref.model, "benchmark": ref.benchmark, "seed": seed}
            out.append({**base, "stages": {}, "metrics": {}, "mlflow_run_id": None, **r, "dispatch": where})
        return out
    if state is not None and state.is_completed():
        error = (
            f"completed on its worker, but its results ({result_path(settings, ref)}) are not visible here: "
            "point TUNEVAL_CACHE_DIR at storage that every worker and this machine share"
        )
    else:
        kind = state.type.value.lower() if state else "unknown"
        error = f"flow run {run.id} {kind} on pool: {(state.message if state else '') or 'no message'}"
    return [
        {
            "pipeline": ref.pipeline,
            "model": ref.model,
            "benchmark": ref.benchmark,
            "seed": seed,
            "status": "failed",
            "mlflow_run_id": None,
            "stages": {},
            "metrics": {},
            "error": error,
            "dispatch": where,
        }
        for seed in ref.seeds
    ]


def run_dispatch(
    api_url: str | None, groups: list[GroupRef], settings: Settings, force: str | None, how: Dispatch
) -> list[dict[str, Any]]:
    """``dispatch_flow`` against the Prefect API at ``api_url`` (None: the configured one)."""
    if api_url is None:
        return dispatch_flow(groups, settings, force, how)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        return dispatch_flow(groups, settings, force, how)
