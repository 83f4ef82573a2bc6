"""One-line run descriptions (MLflow's ``mlflow.note.content``: the runs table's Description column
and the run page's description) with the run's result.

The numbers are the report's own cells (``reporting.render.mean_ci`` of the same estimates
``reporting.rules`` reads back from these runs), so the UI and ``tuneval report`` agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tuneval.reporting.render import mean_ci
from tuneval.reporting.rules import Estimate

NOTE_TAG = "mlflow.note.content"


def _ordered(names: Iterable[str], first: Iterable[str]) -> list[str]:
    names = list(names)
    head = [n for n in first if n in names]
    return head + sorted(n for n in names if n not in head)


def run_note(metrics: Mapping[str, float], cis: Mapping[str, Mapping[str, float]], order: Iterable[str] = ()) -> str:
    """``accuracy 0.9833 ± 0.0250 · f1 0.9831 ± 0.0254 (mean ± half-width of the 95% bootstrap CI
    over test examples)``: one seed's test metrics in the benchmark's order."""
    cells = []
    for name in _ordered(metrics, order):
        ci = cis.get(name, {})
        cells.append(f"{name} {mean_ci(Estimate(metrics[name], ci.get('ci_low'), ci.get('ci_high')))}")
    if not cells:
        return "no test metrics"
    return " · ".join(cells) + (" (mean ± half-width of the 95% bootstrap CI over test examples)" if cis else "")


def group_note(summary: Mapping[str, Any], order: Iterable[str] = (), n_planned: int | None = None) -> str:
    """``accuracy 0.7167 ± 3.3883 · ... (mean ± half-width of the 95% t-interval over 2 seeds)``,
    from one ``record.summarize`` group."""
    stats = summary["metrics"]
    cells = [
        f"{name} {mean_ci(Estimate(s['mean'], s.get('ci_low'), s.get('ci_high')))}"
        for name, s in ((n, stats[n]) for n in _ordered(stats, order))
    ]
    n = len(summary["seeds"])
    of = f" of {n_planned}" if n_planned and n_planned != n else ""
    if n < 2:  # no spread over one seed: the report shows that seed's own bootstrap CI
        return " · ".join(cells) + f" (only {n}{of} seeds completed)"
    return " · ".join(cells) + f" (mean ± half-width of the 95% t-interval over {n}{of} seeds)"


def failed_note(stage: str, error: str) -> str:
    first = (error.splitlines() or [""])[0]
    return f"failed in {stage}: {first[:300]}"
