"""Stage 5: metrics from the stored predictions (no model needed)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval.config.runs import RunSpec
from tuneval.pipeline import stages
from tuneval.pipeline.store import ArtifactRef, StageOutcome
from tuneval.settings import Settings


@task(name="score", cache_policy=NO_CACHE, persist_result=False)
def score_task(
    run: RunSpec, settings: Settings, predicted: ArtifactRef, prepared: ArtifactRef, force: bool = False
) -> StageOutcome:
    return stages.score(run, settings, predicted, prepared, force)
