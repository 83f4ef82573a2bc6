"""Stage 2: check columns and labels, format and tokenize to Arrow."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval.config.runs import RunSpec
from tuneval.pipeline import stages
from tuneval.pipeline.store import ArtifactRef, StageOutcome
from tuneval.settings import Settings


@task(name="prepare", cache_policy=NO_CACHE, persist_result=False)
def prepare_task(run: RunSpec, settings: Settings, loaded: ArtifactRef, force: bool = False) -> StageOutcome:
    return stages.prepare(run, settings, loaded, force)
