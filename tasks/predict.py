"""Stage 4: batched inference on the test split; predictions stored per example."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval.config.runs import RunSpec
from tuneval.pipeline import stages
from tuneval.pipeline.store import ArtifactRef, StageOutcome
from tuneval.settings import Settings


@task(name="predict", cache_policy=NO_CACHE, persist_result=False)
def predict_task(
    run: RunSpec, settings: Settings, tuned: ArtifactRef, prepared: ArtifactRef, force: bool = False
) -> StageOutcome:
    return stages.predict(run, settings, tuned, prepared, force)
