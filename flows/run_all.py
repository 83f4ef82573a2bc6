"""The run flow: fan out over every run of the selected pipelines, one subflow each."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import user_errors
from flows.pipeline_run import pipeline_run_flow
from tuneval.config.runs import RunSpec
from tuneval.errors import TunevalError
from tuneval.leaderboard import flag_after_run
from tuneval.record import SeedGroup, group_by_seeds
from tuneval.settings import Settings

user_errors.install()


@flow(name="tuneval", persist_result=False, validate_parameters=False)
def run_flow(runs: list[RunSpec], settings: Settings, force_from: str | None = None) -> list[dict[str, Any]]:
    """Runs go one after another: on a small machine parallel fine-tunes only fight for cores.
    A failed run is recorded and the others still run."""
    results = []
    for (pipeline, model, benchmark), group in group_by_seeds(runs).items():
        parent = SeedGroup(settings, pipeline, model, benchmark, [r.seed for r in group]) if len(group) > 1 else None
        group_results = []
        for run in group:
            try:
                group_results.append(pipeline_run_flow(run, settings, force_from, parent and parent.run_id))
            except TunevalError as e:
                group_results.append(
                    getattr(e, "tuneval_result", None) or {"run": run.run_name, "status": "failed", "error": str(e)}
                )
        if parent is not None:
            parent.close(group_results)
        results += group_results
    flag_after_run(settings, list(dict.fromkeys(r.pipeline for r in runs)))  # tags + warns on regressions
    return results
