"""Stage 3: the seed's recipe: pre-trained backbone + new head, trained with the written-out loop."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval import stages
from tuneval.artifacts import ArtifactRef, StageOutcome
from tuneval.config.runs import RunSpec
from tuneval.settings import Settings


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def finetune_task(run: RunSpec, settings: Settings, prepared: ArtifactRef, force: bool = False) -> StageOutcome:
    return stages.finetune(run, settings, prepared, force)
