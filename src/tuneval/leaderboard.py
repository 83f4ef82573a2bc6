"""``tuneval report`` and the post-run regression check: MLflow runs -> report files, artifacts, tags.

The rules live in ``report.py`` (pure); this module only fetches runs through ``Tracker``, writes
``report.md``/``report.html``/``report.png``, logs them under ``report/`` on every latest run (the
seed-group parent, or the single run) and tags those runs with the regression verdict.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneval import report as rp
from tuneval.errors import TunevalError
from tuneval.settings import Settings
from tuneval.tracking import Tracker

log = logging.getLogger(__name__)

FILES = ("report.md", "report.html", "report.png")


def load(tracker: Tracker, pipeline: str) -> rp.Report | None:
    runs = tracker.pipeline_runs(pipeline)
    return rp.build(pipeline, runs) if runs else None


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


def write(report: rp.Report, folder: Path) -> list[Path]:
    from tuneval.chart import write_png

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(rp.markdown(report))
    (folder / "report.html").write_text(rp.to_html(report))
    write_png(report, folder / "report.png")
    return [folder / f for f in FILES]


def publish(settings: Settings, pipelines: list[str], out: Path) -> list[tuple[rp.Report, list[Path]]]:
    """Report each pipeline into ``out/<pipeline>/``, log the files on its latest runs, tag regressions."""
    tracker = Tracker(settings.tracking_uri, settings.artifact_root)
    tracker.check()
    done = []
    for pipeline in pipelines:
        report = load(tracker, pipeline)
        if report is None:
            raise TunevalError(
                f"pipeline '{pipeline}' has no tracked runs in {settings.tracking_uri}; "
                f"run `tuneval run {pipeline}` first (runs logged before tuneval 'report' support are not read)"
            )
        paths = write(report, out / pipeline)
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
            for line in rp.summary_lines(report)[1:]:
                log.warning("%s: regression %s", pipeline, line[2:])
        return found
    except Exception as e:  # noqa: BLE001
        log.warning("regression check failed: %s", str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return []
