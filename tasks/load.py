"""Stage 1: materialise the benchmark's splits as Arrow."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneval.config.runs import RunSpec
from tuneval.pipeline import stages
from tuneval.pipeline.store import StageOutcome
from tuneval.settings import Settings


@task(name="load", cache_policy=NO_CACHE, persist_result=False)
def load_task(run: RunSpec, settings: Settings, force: bool = False) -> StageOutcome:
    return stages.load(run, settings, force)
