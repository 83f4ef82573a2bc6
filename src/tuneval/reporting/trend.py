"""The report's trend: every benchmark x metric over the last K invocations, one line per model with
its 95% CI as a band. A recurring benchmark's users want to see a drift, not only the last step
(which is all the regression rule compares)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tuneval.reporting.rules import Entry, Estimate, higher_is_better


@dataclass(frozen=True)
class Point:
    invocation: str
    started: int  # ms: the invocation's first run
    model: str
    benchmark: str
    metric: str
    estimate: Estimate


def points(entries: list[Entry], history: int) -> list[Point]:
    """Each entry's metrics, for the ``history`` most recent invocations (ordered by their first run)."""
    started: dict[str, int] = {}
    for e in entries:
        started[e.invocation] = min(started.get(e.invocation, e.started), e.started)
    keep = set(sorted(started, key=lambda inv: (started[inv], inv))[-history:]) if history > 0 else set()
    return [
        Point(e.invocation, started[e.invocation], e.model, e.benchmark, name, est)
        for e in entries
        if e.invocation in keep
        for name, est in e.metrics.items()
    ]


def label(ms: int) -> str:
    return time.strftime("%m-%d %H:%M", time.gmtime(ms / 1000))


def write_png(pipeline: str, pts: list[Point], path: Path) -> Path:
    """One panel per benchmark x metric: x = invocation (oldest left), a line per model, CI bands."""
    from matplotlib.figure import Figure

    panels = sorted({(p.benchmark, p.metric) for p in pts}) or [("-", "-")]
    invocations = sorted({(p.started, p.invocation) for p in pts})
    x_of = {inv: i for i, (_, inv) in enumerate(invocations)}
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows), layout="constrained")
    for i, (bench, metric) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        mine = [p for p in pts if (p.benchmark, p.metric) == (bench, metric)]
        for model in sorted({p.model for p in mine}):
            line = sorted((x_of[p.invocation], p.estimate) for p in mine if p.model == model)
            xs = [x for x, _ in line]
            ax.plot(xs, [e.mean for _, e in line], marker="o", label=model)
            banded = [(x, e) for x, e in line if e.ci_low is not None and e.ci_high is not None]
            if banded:
                ax.fill_between(
                    [x for x, _ in banded], [e.ci_low for _, e in banded], [e.ci_high for _, e in banded], alpha=0.2
                )
        ax.set_xticks(range(len(invocations)), [label(s) for s, _ in invocations], rotation=30, ha="right", fontsize=7)
        arrow = "higher" if higher_is_better(metric) else "lower"
        ax.set_title(f"{bench}: {metric} ({arrow} is better)", fontsize=9)
        if mine:
            ax.legend(fontsize=7)
    fig.suptitle(f"{pipeline}: the last {len(invocations)} invocations (mean, 95% CI band)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
