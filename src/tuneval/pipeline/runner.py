"""The order of things, independent of who executes them.

``run_stages`` is one run's stage sequence (load -> prepare -> [intrinsic] -> finetune ->
predict -> score) with its MLflow record; ``run_groups`` walks the runs of an invocation seed
group by seed group. Prefect's flows (``flows/``) hand in their tasks and subflow as the
callables; ``all_cached`` replays the same sequence with the plain stage functions in lookup-only
mode to tell whether an invocation has anything to build at all (then the CLI records it
without starting Prefect: its temporary server would be most of a cached rerun's time).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from tuneval.config.runs import RunSpec
from tuneval.errors import TunevalError
from tuneval.pipeline import finetune, keys, stages
from tuneval.pipeline.store import NotCached, StageOutcome, lookup_only
from tuneval.settings import Settings
from tuneval.tracking.record import RunRecord, SeedGroup, group_by_seeds

log = logging.getLogger(__name__)
StageFn = Callable[..., StageOutcome]


def finetune_fused(
    runs: list[RunSpec], settings: Settings, prepared: Any, force: bool = False
) -> tuple[dict[int, StageOutcome], str | None]:
    """A seed group's finetune artifacts in one multi-seed pass (``finetune_group``; imports torch)."""
    from tuneval.pipeline import finetune_group

    return finetune_group.finetune_seeds(runs, settings, prepared, force)


PLAIN: Mapping[str, Callable[..., Any]] = {
    "load": stages.load,
    "prepare": stages.prepare,
    "intrinsic": stages.intrinsic,
    "finetune": finetune.finetune,
    "predict": stages.predict,
    "score": stages.score,
    "finetune_fused": finetune_fused,
}
RunOne = Callable[[RunSpec, Settings, "str | None", "str | None", "StageOutcome | None"], dict[str, Any]]


def forced_stages(force_from: str | None) -> set[str]:
    return set(keys.ORDER[keys.ORDER.index(force_from) :]) if force_from else set()


def run_stages(
    run: RunSpec,
    settings: Settings,
    fns: Mapping[str, StageFn] = PLAIN,
    force_from: str | None = None,
    parent_run_id: str | None = None,
    flow_run_id: str | None = None,
    fused: StageOutcome | None = None,
) -> dict[str, Any]:
    """Run the stages in order; on failure mark the MLflow run FAILED and re-raise. ``fused``: this
    seed's finetune outcome when its seed group was trained in one fused pass (status "fused")."""
    forced = forced_stages(force_from)
    record = RunRecord.open(run, settings, flow_run_id=flow_run_id, parent_run_id=parent_run_id)
    stage = "load"
    try:
        loaded = fns["load"](run, settings, "load" in forced)
        record.stage_done(stage, loaded)
        stage = "prepare"
        prepared = fns["prepare"](run, settings, loaded.ref, "prepare" in forced)
        record.stage_done(stage, prepared)
        if stages.has_intrinsic(run):
            stage = "intrinsic"
            record.stage_done(stage, fns["intrinsic"](run, settings, prepared.ref, "intrinsic" in forced))
        stage = "finetune"
        tuned = fused or fns["finetune"](run, settings, prepared.ref, "finetune" in forced)
        record.stage_done(stage, tuned)
        stage = "predict"
        predicted = fns["predict"](run, settings, tuned.ref, prepared.ref, "predict" in forced)
        record.stage_done(stage, predicted)
        stage = "score"
        scored = fns["score"](run, settings, predicted.ref, prepared.ref, "score" in forced)
        record.stage_done(stage, scored)
    except BaseException as e:
        record.fail(stage, e)
        e.tuneval_result = record.result()  # type: ignore[attr-defined]
        raise
    record.close()
    return record.result()


def run_groups(
    runs: list[RunSpec],
    settings: Settings,
    run_one: RunOne,
    force_from: str | None = None,
    fns: Mapping[str, Callable[..., Any]] = PLAIN,
) -> list[dict[str, Any]]:
    """Runs go one after another: on a small machine parallel fine-tunes only fight for cores.
    Several seeds of one model x benchmark nest under a parent MLflow run carrying their
    statistics. A failed run is recorded and the others still run."""
    results = []
    for group in group_by_seeds(runs).values():
        results += run_group(group, settings, run_one, force_from, fns)
    from tuneval.reporting.publish import flag_after_run

    flag_after_run(settings, list(dict.fromkeys(r.pipeline for r in runs)))  # tags + warns on regressions
    return results


def run_group(
    group: list[RunSpec],
    settings: Settings,
    run_one: RunOne,
    force_from: str | None = None,
    fns: Mapping[str, Callable[..., Any]] = PLAIN,
) -> list[dict[str, Any]]:
    """One seed group (the runs of one pipeline x model x benchmark): its parent MLflow run, the
    fused pass when it applies, then each seed's run. Also the unit a work-pool worker runs."""
    pipeline, model, benchmark = group[0].pipeline, group[0].model_name, group[0].benchmark_name
    parent = SeedGroup(settings, pipeline, model, benchmark, [r.seed for r in group]) if len(group) > 1 else None
    fused, run_force = fuse_group(group, settings, fns, force_from) if len(group) > 1 else ({}, force_from)
    group_results = []
    for run in group:
        try:
            parent_id = parent and parent.run_id
            group_results.append(run_one(run, settings, run_force, parent_id, fused.get(run.seed)))
        except TunevalError as e:
            group_results.append(
                getattr(e, "tuneval_result", None) or {"run": run.run_name, "status": "failed", "error": str(e)}
            )
    if parent is not None:
        parent.close(group_results)
    return group_results


def fuse_group(
    group: list[RunSpec], settings: Settings, fns: Mapping[str, Callable[..., Any]], force_from: str | None
) -> tuple[dict[int, StageOutcome], str | None]:
    """Train a seed group's fine-tunes in one fused pass before its runs (``train.fuse_seeds``).

    Returns each fused seed's finetune outcome and the ``force_from`` left for the runs: stages
    forced here are not forced again. Anything going wrong here leaves the seeds to their own runs.
    """
    if not keys.hashed_dropout(group[0]):
        return {}, force_from  # fusion off: nothing to do before the runs
    if group[0].train.devices > 1:
        log.warning(
            "finetune: %s trains each seed on %d devices instead of fusing seeds",
            group[0].pipeline,
            group[0].train.devices,
        )
        return {}, force_from
    if group[0].benchmark.problem != "classification" or stages.has_intrinsic(group[0]):
        log.warning("finetune: %s trained one seed at a time: only classification is fused so far", group[0].pipeline)
        return {}, force_from
    forced = forced_stages(force_from)
    try:
        loaded = fns["load"](group[0], settings, "load" in forced)
        prepared = fns["prepare"](group[0], settings, loaded.ref, "prepare" in forced)
        store = stages.store_of(settings)
        if "finetune" not in forced and all(
            store.lookup("finetune", keys.finetune_key(r, settings, prepared.ref)[0]) for r in group
        ):
            return {}, force_from  # every seed cached: nothing to fuse (and no torch import)
        fused, _reason = fns["finetune_fused"](group, settings, prepared.ref, "finetune" in forced)
    except Exception as e:  # noqa: BLE001 - each run reports its own failure
        log.warning("finetune: fusing seeds failed (%s); each seed runs alone", str(e).splitlines()[0][:200])
        return {}, force_from
    if "finetune" in forced:  # load/prepare (and the fused seeds' finetune) were rebuilt above
        force_from = "predict" if fused else "finetune"
    return fused, force_from


def all_cached(runs: list[RunSpec], settings: Settings, force_from: str | None = None) -> bool:
    """True when every stage of every run has a verified artifact: nothing would be built."""
    if force_from:
        return False
    quiet = dataclasses.replace(settings, track=False)
    with lookup_only():
        for run in runs:
            try:
                run_stages(run, quiet)
            except NotCached:
                return False
            except TunevalError:
                return False  # let the real invocation report it, with its MLflow run
    return True


def run_plain(
    run: RunSpec,
    settings: Settings,
    force_from: str | None = None,
    parent_run_id: str | None = None,
    fused: StageOutcome | None = None,
) -> dict[str, Any]:
    """One run with the plain stage functions (no orchestrator)."""
    return run_stages(run, settings, PLAIN, force_from, parent_run_id, fused=fused)
