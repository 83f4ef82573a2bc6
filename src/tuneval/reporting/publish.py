"""``tuneval report`` and the post-run regression check: MLflow runs -> report files, artifacts, tags.

The rules live in ``report.py`` (pure); this module only fetches runs through ``Tracker``, writes
``report.md``/``report.html``/``report.png``, logs them under ``report/`` on every latest run (the
seed-group parent, or the single run) and tags those runs with the regression verdict. For the
pairwise comparisons (``pairs.py``) it downloads each run's ``predictions/predictions.parquet``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tuneval.errors import TunevalError
from tuneval.reporting import pairs as pairs_mod
from tuneval.reporting import render, trend
from tuneval.reporting import rules as rp
from tuneval.settings import Settings
from tuneval.tracking import queries
from tuneval.tracking.client import Tracker

log = logging.getLogger(__name__)

FILES = ("report.md", "report.html", "report.png", "trend.png")
HISTORY = 10  # invocations on the trend chart


def fetch(tracker: Tracker, pipeline: str, history: int = HISTORY) -> list[dict[str, Any]] | None:
    """The runs a report reads, asked of MLflow with server-side filters (``tracking.queries``), not
    every run of the experiment: the last ``history`` invocations' heads, the latest one's runs, and
    each latest model x benchmark's previous entry."""
    return queries.report_runs(tracker, pipeline, history, is_entry=lambda r: bool(rp.entries(pipeline, [r])))


def load(tracker: Tracker, pipeline: str, pairs: bool = False, history: int = HISTORY) -> rp.Report | None:
    """The report; with ``pairs`` also its pairwise comparisons (downloads the runs' predictions)."""
    return load_with_runs(tracker, pipeline, pairs, history)[0]


def load_with_runs(
    tracker: Tracker, pipeline: str, pairs: bool = False, history: int = HISTORY
) -> tuple[rp.Report | None, list[dict[str, Any]]]:
    runs = fetch(tracker, pipeline, history) or []
    report = rp.build(pipeline, runs) if runs else None
    if report is None or not pairs:
        return report, runs
    with tempfile.TemporaryDirectory(prefix="tuneval-pairs-") as tmp:
        compared = pairs_mod.compare(report, runs, predictions_of(tracker, Path(tmp)))
    return dataclasses.replace(report, pairs=compared), runs


def predictions_of(tracker: Tracker, folder: Path) -> pairs_mod.Examples:
    """run_id -> (its predictions.parquet as columns, its params), read from the run's MLflow artifacts."""

    def examples(run_id: str) -> tuple[dict[str, list[Any]], dict[str, str]] | None:
        path = tracker.download(run_id, "predictions/predictions.parquet", folder / run_id)
        if path is None or not path.is_file():
            return None
        return pq.read_table(path).to_pydict(), tracker.run_params(run_id)

    return examples


def tag_regressions(tracker: Tracker, report: rp.Report) -> None:
    """On each latest run: tuneval.regression=true|false, tuneval.regressed_metrics, tuneval.compared_with."""
    for e in report.latest:
        mine = [c for c in report.changes if (c.model, c.benchmark) == (e.model, e.benchmark)]
        bad = [c.metric for c in mine if c.regressed]
        tracker.set_tags(
            e.run_id,
            {
                "tuneval.regression": "true" if bad else "false",
                "tuneval.regressed_metrics": ",".join(bad),
                "tuneval.compared_with": mine[0].previous_run_id if mine else "none",
            },
        )


def write(report: rp.Report, folder: Path, trend_points: list[trend.Point] | None = None) -> list[Path]:
    from tuneval.reporting.chart import write_png

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(render.markdown(report, trend="trend.png"))
    (folder / "report.html").write_text(render.to_html(report, trend="trend.png"))
    write_png(report, folder / "report.png")
    trend.write_png(report.pipeline, trend_points or [], folder / "trend.png")
    return [folder / f for f in FILES]


def publish(
    settings: Settings, pipelines: list[str], out: Path, history: int = HISTORY
) -> list[tuple[rp.Report, list[Path]]]:
    """Report each pipeline into ``out/<pipeline>/``, log the files on its latest runs, tag regressions."""
    tracker = Tracker(settings.tracking_uri, settings.artifact_root)
    tracker.check()
    done = []
    for pipeline in pipelines:
        report, runs = load_with_runs(tracker, pipeline, pairs=True, history=history)
        if report is None:
            raise TunevalError(
                f"pipeline '{pipeline}' has no tracked runs in {settings.tracking_uri}; "
                f"run `tuneval run {pipeline}` first (runs logged before tuneval 'report' support are not read)"
            )
        paths = write(report, out / pipeline, trend.points(rp.entries(pipeline, runs), history))
        for e in report.latest:
            for p in paths:
                tracker.log_artifact(e.run_id, p, "report")
        tag_regressions(tracker, report)
        done.append((report, paths))
    return done


def tracked_pipelines(settings: Settings, declared: list[str]) -> list[str]:
    """The declared pipelines that have report-ready runs; an error when none has."""
    tracker = Tracker(settings.tracking_uri, settings.artifact_root)
    tracker.check()
    names = [p for p in declared if load(tracker, p) is not None]
    if not names:
        raise TunevalError(
            f"no tracked runs of any pipeline ({', '.join(declared)}) in {settings.tracking_uri}; "
            "run `tuneval run` first"
        )
    return names


def flag_after_run(settings: Settings, pipelines: list[str]) -> list[rp.Change]:
    """After `tuneval run`: tag this invocation's runs and warn about regressions. Never raises:
    a report problem must not turn a finished run into a failure."""
    if not settings.track:
        return []
    try:
        tracker = Tracker(settings.tracking_uri, settings.artifact_root)
        found: list[rp.Change] = []
        for pipeline in pipelines:
            report = load(tracker, pipeline)
            if report is None or report.invocation != settings.invocation:
                continue
            tag_regressions(tracker, report)
            found += report.regressions
            for line in render.summary_lines(report)[1:]:
                log.warning("%s: regression %s", pipeline, line[2:])
        return found
    except Exception as e:  # noqa: BLE001
        log.warning("regression check failed: %s", str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return []
