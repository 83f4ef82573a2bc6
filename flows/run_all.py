"""The run flow: fan out over every run of the selected pipelines, one subflow each."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from flows import user_errors
from flows.pipeline_run import pipeline_run_flow
from tasks import fused_finetune_task, load_task, prepare_task
from tuneval.artifacts import StageOutcome
from tuneval.config.runs import RunSpec
from tuneval.errors import TunevalError
from tuneval.record import SeedGroup, group_by_seeds
from tuneval.settings import Settings
from tuneval.stages import ORDER, has_intrinsic, hashed_dropout

user_errors.install()
log = logging.getLogger(__name__)


@flow(name="tuneval", persist_result=False, validate_parameters=False)
def run_flow(runs: list[RunSpec], settings: Settings, force_from: str | None = None) -> list[dict[str, Any]]:
    """Runs go one after another: on a small machine parallel fine-tunes only fight for cores.
    A failed run is recorded and the others still run."""
    results = []
    for (pipeline, model, benchmark), group in group_by_seeds(runs).items():
        parent = SeedGroup(settings, pipeline, model, benchmark, [r.seed for r in group]) if len(group) > 1 else None
        fused, run_force = fuse_seeds(group, settings, force_from) if len(group) > 1 else ({}, force_from)
        group_results = []
        for run in group:
            try:
                parent_id = parent and parent.run_id
                group_results.append(pipeline_run_flow(run, settings, run_force, parent_id, fused.get(run.seed)))
            except TunevalError as e:
                group_results.append(
                    getattr(e, "tuneval_result", None) or {"run": run.run_name, "status": "failed", "error": str(e)}
                )
        if parent is not None:
            parent.close(group_results)
        results += group_results
    return results


def fuse_seeds(
    group: list[RunSpec], settings: Settings, force_from: str | None
) -> tuple[dict[int, StageOutcome], str | None]:
    """Train a seed group's fine-tunes in one fused pass before its runs (``train.fuse_seeds``).

    Returns each fused seed's finetune outcome and the ``force_from`` left for the runs: stages
    forced here are not forced again. Anything going wrong here leaves the seeds to their own runs.
    """
    if not hashed_dropout(group[0], settings):
        return {}, force_from  # fusion off: nothing to do before the runs
    if group[0].benchmark.problem != "classification" or has_intrinsic(group[0]):
        log.warning("finetune: %s trained one seed at a time: only classification is fused so far", group[0].pipeline)
        return {}, force_from
    forced = set(ORDER[ORDER.index(force_from) :]) if force_from else set()
    try:
        loaded = load_task(group[0], settings, "load" in forced)
        prepared = prepare_task(group[0], settings, loaded.ref, "prepare" in forced)
        fused, reason = fused_finetune_task(group, settings, prepared.ref, "finetune" in forced)
    except Exception as e:  # noqa: BLE001 - each run reports its own failure
        log.warning("finetune: fusing seeds failed (%s); each seed runs alone", str(e).splitlines()[0][:200])
        return {}, force_from
    if "finetune" in forced:  # load/prepare (and the fused seeds' finetune) were rebuilt above
        force_from = "predict" if fused else "finetune"
    return fused, force_from
