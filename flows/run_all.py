"""The run flow: fan out over every run of the selected pipelines, one subflow each."""

from __future__ import annotations

from typing import Any

from prefect import flow
from tuneval.flows import user_errors
from tuneval.flows.pipeline_run import TASKS, pipeline_run_flow

from tuneval.config.runs import RunSpec
from tuneval.pipeline.runner import run_groups
from tuneval.settings import Settings

user_errors.install()


@flow(name="tuneval", persist_result=False, validate_parameters=False)
def run_flow(runs: list[RunSpec], settings: Settings, force_from: str | None = None) -> list[dict[str, Any]]:
    """Every run as a subflow, seed group by seed group (``tuneval.runner.run_groups``)."""
    return run_groups(runs, settings, pipeline_run_flow, force_from, TASKS)


def run_flow_on(
    api_url: str | None, runs: list[RunSpec], settings: Settings, force_from: str | None = None
) -> list[dict[str, Any]]:
    """``run_flow`` against the Prefect API at ``api_url`` (None: Prefect's own choice)."""
    if api_url is None:
        return run_flow(runs, settings, force_from)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        return run_flow(runs, settings, force_from)
