"""What the report and the dispatcher ask MLflow, as server-side searches (``filter_string``,
``order_by``) instead of paging every run of an experiment through the client.

A report needs the latest invocation, each of its model x benchmark heads' previous entry, the
last K invocations' heads for the trend, and the latest invocation's seed runs (pairs, cache
column): ``report_runs`` fetches exactly those. "Head" = a run without a parent (a seed-group
parent or a one-seed run); heads are found with ``tags."mlflow.parentRunId" IS NULL``, newest
first, and the search stops as soon as enough invocations are seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from tuneval.tracking.client import Tracker

log = logging.getLogger(__name__)

PAGE = 500
HEADS = 'tags."tuneval.invocation" IS NOT NULL and tags."mlflow.parentRunId" IS NULL'


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _plain(r: Any) -> dict[str, Any]:
    return {
        "run_id": r.info.run_id,
        "status": r.info.status,
        "start_time": r.info.start_time,
        "tags": dict(r.data.tags),
        "metrics": dict(r.data.metrics),
    }


def _newest_first(tracker: Tracker, experiment_id: str, where: str, limit: int | None = None) -> Iterator[Any]:
    """MLflow runs matching ``where``, newest first, one page at a time as they are consumed; the
    pages stop at ``limit`` runs."""
    token, n = None, 0
    while limit is None or n < limit:
        page = tracker.client.search_runs(
            [experiment_id],
            filter_string=where,
            order_by=["attributes.start_time DESC"],
            max_results=PAGE if limit is None else min(PAGE, limit - n),
            page_token=token,
        )
        n += len(page)
        yield from page
        token = page.token
        if not token:
            return


def search(tracker: Tracker, experiment_id: str, where: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Runs matching ``where``, newest first (at most ``limit``), as ``Tracker.pipeline_runs`` gives them."""
    return [_plain(r) for r in _newest_first(tracker, experiment_id, where, limit)]


def _recent_heads(tracker: Tracker, experiment_id: str, invocations: int) -> list[dict[str, Any]]:
    """Heads of the ``invocations`` most recent invocations (by their newest run), newest first."""
    out: list[dict[str, Any]] = []
    seen: list[str] = []
    for r in _newest_first(tracker, experiment_id, f"{HEADS} and attributes.status != 'RUNNING'"):
        inv = r.data.tags.get("tuneval.invocation", "")
        if inv not in seen:
            if len(seen) == invocations:
                break
            seen.append(inv)
        out.append(_plain(r))
    return out


def report_runs(
    tracker: Tracker, pipeline: str, history: int = 10, is_entry: Callable[[dict[str, Any]], bool] | None = None
) -> list[dict[str, Any]] | None:
    """The runs a report of ``pipeline`` reads (None when its experiment does not exist): the heads
    of its last ``history`` (at least 2) invocations, every run of the latest invocation, for each
    latest model x benchmark missing there its most recent earlier entry, and the seed runs of any
    group head whose statistics rest on one surviving seed. ``is_entry``: whether a head counts
    for the leaderboard (the report's own rule; default: it has test metrics)."""
    entry = is_entry or _has_test_metrics
    exp = tracker.client.get_experiment_by_name(pipeline)
    if exp is None:
        return None
    eid = exp.experiment_id
    heads = [h for h in _recent_heads(tracker, eid, max(2, history)) if entry(h)]
    if not heads:
        return []
    # The report orders invocations by their first entry: the latest is the one started last.
    first: dict[str, int] = {}
    for h in heads:
        inv = h["tags"]["tuneval.invocation"]
        first[inv] = min(first.get(inv, h["start_time"] or 0), h["start_time"] or 0)
    latest = max(first, key=lambda inv: (first[inv], inv))
    runs = {r["run_id"]: r for r in heads}
    for r in search(tracker, eid, f'tags."tuneval.invocation" = {_quote(latest)}'):
        runs[r["run_id"]] = r

    def pair(r: dict[str, Any]) -> tuple[str, str]:
        return r["tags"].get("tuneval.model", "?"), r["tags"].get("tuneval.benchmark", "?")

    wanted = {pair(h) for h in heads if h["tags"]["tuneval.invocation"] == latest}
    covered = {pair(h) for h in heads if h["tags"]["tuneval.invocation"] != latest}
    for model, bench in sorted(wanted - covered):
        where = (
            f"{HEADS} and attributes.status != 'RUNNING' and tags.\"tuneval.model\" = {_quote(model)} "
            f'and tags."tuneval.benchmark" = {_quote(bench)} and tags."tuneval.invocation" != {_quote(latest)}'
        )
        for r in search(tracker, eid, where, limit=50):
            if entry(r):
                runs[r["run_id"]] = r
                break  # the most recent earlier entry: all the regression rule compares with
    for h in list(runs.values()):
        one_seed = h["tags"].get("tuneval.kind") == "seed-group" and h["metrics"].get("n_seeds") == 1
        if one_seed and h["tags"].get("tuneval.invocation") != latest:
            for r in search(tracker, eid, f'tags."mlflow.parentRunId" = {_quote(h["run_id"])}'):
                runs[r["run_id"]] = r
    return list(runs.values())


def _has_test_metrics(run: dict[str, Any]) -> bool:
    return any(k.startswith("test_") for k in run["metrics"])


def has_heads(tracker: Tracker, pipeline: str) -> bool:
    """Whether the pipeline's experiment holds any invocation-tagged head: one row asked for."""
    exp = tracker.client.get_experiment_by_name(pipeline)
    return exp is not None and bool(search(tracker, exp.experiment_id, HEADS, limit=1))


def supersede(tracker: Tracker, pipeline: str, model: str, benchmark: str, invocation: str) -> list[str]:
    """Mark the RUNNING MLflow runs an earlier attempt of this group left (its worker died) KILLED,
    tagged ``tuneval.superseded=true``: the retry records the group afresh. Returns their ids."""
    exp = tracker.client.get_experiment_by_name(pipeline)
    if exp is None:
        return []
    where = (
        f'tags."tuneval.invocation" = {_quote(invocation)} and tags."tuneval.model" = {_quote(model)} '
        f"and tags.\"tuneval.benchmark\" = {_quote(benchmark)} and attributes.status = 'RUNNING'"
    )
    ids = [r["run_id"] for r in search(tracker, exp.experiment_id, where)]
    for rid in ids:
        tracker.set_tags(rid, {"tuneval.superseded": "true"})
        tracker.client.set_terminated(rid, "KILLED")
    if ids:
        log.warning(
            "%s/%s/%s: closed %d MLflow runs of an earlier, crashed attempt", pipeline, model, benchmark, len(ids)
        )
    return ids
