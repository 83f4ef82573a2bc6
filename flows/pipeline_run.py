"""One run: model x benchmark x seed through load -> prepare -> finetune -> predict -> score."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from tuneval.tasks import (
    finetune_task,
    fused_finetune_task,
    intrinsic_task,
    load_task,
    predict_task,
    prepare_task,
    score_task,
)

from tuneval.config.runs import RunSpec
from tuneval.pipeline.runner import run_stages
from tuneval.pipeline.store import StageOutcome
from tuneval.settings import Settings

TASKS = {
    "load": load_task,
    "prepare": prepare_task,
    "intrinsic": intrinsic_task,
    "finetune": finetune_task,
    "predict": predict_task,
    "score": score_task,
    "finetune_fused": fused_finetune_task,
}


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
    """The stage sequence of ``tuneval.runner`` with each stage as a Prefect task; ``fused``: this
    seed's finetune outcome from its group's fused pass."""
    return run_stages(run, settings, TASKS, force_from, parent_run_id, flow_run_id=flow_run.get_id(), fused=fused)
