"""Stage 3: the seed's recipe: pre-trained backbone + new head, trained with the written-out loop."""

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval.config.runs import RunSpec
from tuneval.pipeline import finetune
from tuneval.pipeline.store import ArtifactRef, StageOutcome
from tuneval.settings import Settings


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def finetune_task(run: RunSpec, settings: Settings, prepared: ArtifactRef, force: bool = False) -> StageOutcome:
    return finetune.finetune(run, settings, prepared, force)


@task(name="finetune-fused", cache_policy=NO_CACHE, persist_result=False)
def fused_finetune_task(
    runs: list[RunSpec], settings: Settings, prepared: ArtifactRef, force: bool = False
) -> tuple[dict[int, StageOutcome], Any]:
    """A seed group's finetune artifacts in one multi-seed pass (``pipeline.finetune_group``); seeds
    it leaves out are trained by ``finetune_task`` in their own run."""
    from tuneval.pipeline import finetune_group  # torch: imported when a group is fused, not with the flows

    return finetune_group.finetune_seeds(runs, settings, prepared, force)
