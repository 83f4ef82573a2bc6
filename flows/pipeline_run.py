"""One run: model x benchmark x seed through load -> prepare -> finetune -> predict -> score."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from tasks import finetune_task, intrinsic_task, load_task, predict_task, prepare_task, score_task
from tuneval.artifacts import StageOutcome
from tuneval.config.runs import RunSpec
from tuneval.record import RunRecord
from tuneval.settings import Settings
from tuneval.stages import ORDER, has_intrinsic


@flow(
    name="tuneval-run",
    flow_run_name="{run.pipeline}/{run.model_name}/{run.benchmark_name}/seed{run.seed}",
    persist_result=False,
    validate_parameters=False,
)
def pipeline_run_flow(
    run: RunSpec,
    settings: Settings,
    force_from: str | None = None,
    parent_run_id: str | None = None,
    fused: StageOutcome | None = None,
) -> dict[str, Any]:
    """Run the stages in order; on failure mark the MLflow run FAILED and re-raise. ``fused``: this
    seed's finetune outcome when its seed group was trained in one fused pass (status "fused")."""
    forced = set(ORDER[ORDER.index(force_from) :]) if force_from else set()
    record = RunRecord.open(run, settings, flow_run_id=flow_run.get_id(), parent_run_id=parent_run_id)
    stage = "load"
    try:
        loaded = load_task(run, settings, "load" in forced)
        record.stage_done(stage, loaded)
        stage = "prepare"
        prepared = prepare_task(run, settings, loaded.ref, "prepare" in forced)
        record.stage_done(stage, prepared)
        if has_intrinsic(run):
            stage = "intrinsic"
            record.stage_done(stage, intrinsic_task(run, settings, prepared.ref, "intrinsic" in forced))
        stage = "finetune"
        tuned = fused or finetune_task(run, settings, prepared.ref, "finetune" in forced)
        record.stage_done(stage, tuned)
        stage = "predict"
        predicted = predict_task(run, settings, tuned.ref, prepared.ref, "predict" in forced)
        record.stage_done(stage, predicted)
        stage = "score"
        scored = score_task(run, settings, predicted.ref, prepared.ref, "score" in forced)
        record.stage_done(stage, scored)
    except BaseException as e:
        record.fail(stage, e)
        e.tuneval_result = record.result()  # type: ignore[attr-defined]
        raise
    record.close()
    return record.result()
