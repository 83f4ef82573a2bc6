"""The report's PNG: one panel per benchmark x metric, a bar per model, the 95% CI as error bars."""

from __future__ import annotations

from pathlib import Path

from tuneval.reporting.rules import Report, higher_is_better


def write_png(report: Report, path: Path) -> Path:
    # A bare Figure renders with Agg and touches no pyplot global state (no display, thread-safe).
    from matplotlib.figure import Figure

    panels = sorted({(e.benchmark, m) for e in report.latest for m in e.metrics})
    models = sorted({e.model for e in report.latest})
    flagged = {(c.model, c.benchmark, c.metric) for c in report.regressions}
    cols = min(3, max(1, len(panels)))
    rows = (len(panels) + cols - 1) // cols or 1
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    by = {(e.model, e.benchmark): e for e in report.latest}
    previous = {(c.model, c.benchmark, c.metric): c.previous.mean for c in report.changes}
    for i, (bench, metric) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, means, lows, highs, colors = [], [], [], [], []
        for x, model in enumerate(models):
            e = by.get((model, bench))
            est = e.metrics.get(metric) if e else None
            if est is None:
                continue
            xs.append(x)
            means.append(est.mean)
            lows.append(est.mean - est.ci_low if est.ci_low is not None else 0.0)
            highs.append(est.ci_high - est.mean if est.ci_high is not None else 0.0)
            colors.append("tab:red" if (model, bench, metric) in flagged else "tab:blue")
        ax.bar(xs, means, yerr=[lows, highs], capsize=4, color=colors)
        prev = [(x, previous[models[x], bench, metric]) for x in xs if (models[x], bench, metric) in previous]
        if prev:
            ax.scatter(*zip(*prev, strict=True), marker="_", s=600, color="black", zorder=3, label="previous run")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{bench}: {metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)", fontsize=9)
    fig.suptitle(f"{report.pipeline}: mean and 95% CI (red: regressed)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
