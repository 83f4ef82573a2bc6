"""Stage 3: the seed's recipe: pre-trained backbone + new head, trained with the written-out loop."""

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval import stages
from tuneval.artifacts import ArtifactRef, StageOutcome
from tuneval.config.runs import RunSpec
from tuneval.settings import Settings


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def finetune_task(run: RunSpec, settings: Settings, prepared: ArtifactRef, force: bool = False) -> StageOutcome:
    return stages.finetune(run, settings, prepared, force)


@task(name="finetune-fused", cache_policy=NO_CACHE, persist_result=False)
def fused_finetune_task(
    runs: list[RunSpec], settings: Settings, prepared: ArtifactRef, force: bool = False
) -> tuple[dict[int, StageOutcome], Any]:
    """A seed group's finetune artifacts in one fused pass (``tuneval.fused``); seeds it leaves
    out are trained by ``finetune_task`` in their own run."""
    from tuneval import fused  # torch: imported when a group is fused, not with the flows

    return fused.finetune_seeds(runs, settings, prepared, force)
