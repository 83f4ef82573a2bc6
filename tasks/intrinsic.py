"""Stage 2b: the pre-trained model's own scores on the test split (seq2seq perplexity)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval.config.runs import RunSpec
from tuneval.pipeline import stages
from tuneval.pipeline.store import ArtifactRef, StageOutcome
from tuneval.settings import Settings


@task(name="intrinsic", cache_policy=NO_CACHE, persist_result=False)
def intrinsic_task(run: RunSpec, settings: Settings, prepared: ArtifactRef, force: bool = False) -> StageOutcome:
    return stages.intrinsic(run, settings, prepared, force)
