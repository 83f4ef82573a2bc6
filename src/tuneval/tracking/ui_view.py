"""What the MLflow 3 UI shows first: each pipeline's runs table, sorted by its primary test metric.

MLflow 3.17's UI opens an experiment on its GenAI overview unless the URL asks for the
"Machine learning" workflow (``workflowType=machine_learning``); the kind tag
``mlflow.experimentKind`` is for the UIs that read it. The table's sort and columns come from a
saved view: the UI's "Views" menu stores each one as the experiment tag
``mlflow.sharedViewState.<id>`` holding ``{"name", "createdAt", "state"}``, ``state`` being the
JSON of its search facets (``orderByKey``, ``orderByAsc``) and UI state (``selectedColumns``,
``columnOrder``, ``columnWidths``), and loads one from the URL parameter ``viewStateShareKey``
(checked in the UI source: ``useSharedExperimentViewState``, ``ExperimentPageUIState``). tuneval
writes its own view, ``tuneval``: the primary metric is the first column after the run name and
its creation time, then the logged model, the other metrics, and the one-line description.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from tuneval.reporting.rules import higher_is_better
from tuneval.tracking.client import EXPERIMENT_TAGS

VIEW_ID = "tuneval"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
METRIC_WIDTH = 150  # px: "0.8333333333333334" and the header "test_accuracy_mean" fit


@dataclass(frozen=True)
class PipelineView:
    pipeline: str
    primary: str  # the metric key the runs are sorted by
    metrics: tuple[str, ...]  # metric keys shown, primary first

    @property
    def ascending(self) -> bool:
        return not higher_is_better(self.primary.removesuffix("_mean"))

    @property
    def name(self) -> str:
        return f"tuneval: {'lowest' if self.ascending else 'highest'} {self.primary} first"


def pipeline_view(config: Any, pipeline: str) -> PipelineView:
    """The pipeline's primary metric is its first benchmark's first metric; with several seeds the
    seed-group parents (their ``_mean``) are what compares models, so they sort the table."""
    spec = config.pipelines[pipeline]
    names: list[str] = []
    for bench in spec.benchmarks:
        names += [m for m in config.benchmarks[bench].metrics if m not in names]
    seeds = len(spec.seeds) > 1
    keys: list[str] = []
    for name in names:
        keys += [f"test_{name}_mean", f"test_{name}"] if seeds else [f"test_{name}"]
    return PipelineView(pipeline, keys[0], tuple(keys))


def view_state(view: PipelineView) -> dict[str, Any]:
    """The saved view's state: search facets and UI state, as the UI serialises them."""
    primary = [f"metrics.`{k}`" for k in view.metrics if k.removesuffix("_mean") == view.primary.removesuffix("_mean")]
    others = [f"metrics.`{k}`" for k in view.metrics if f"metrics.`{k}`" not in primary]
    # The primary metric first, its model beside it; the description (every metric) last.
    columns = [*primary, "attributes.`Models`", *others, "attributes.`Description`"]
    return {
        "orderByKey": f"metrics.`{view.primary}`",
        "orderByAsc": view.ascending,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {c: METRIC_WIDTH for c in columns if c.startswith("metrics.")},
    }


def runs_url(base: str, experiment_id: str) -> str:
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_ID})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def prepare(client: Any, config: Any, pipelines: list[str], base: str) -> list[tuple[str, str | None]]:
    """Tag each pipeline's experiment (kind, tuneval's saved view); return (pipeline, runs-table
    URL), the URL None for a pipeline with no experiment yet."""
    out: list[tuple[str, str | None]] = []
    for name in pipelines:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            out.append((name, None))
            continue
        view = pipeline_view(config, name)
        state = json.dumps(view_state(view))
        for key, value in EXPERIMENT_TAGS.items():
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        if _saved_state(exp.tags.get(VIEW_TAG)) != (view.name, state):  # rewritten when the config changed it
            envelope = {"name": view.name, "createdAt": int(time.time() * 1000), "state": state}
            client.set_experiment_tag(exp.experiment_id, VIEW_TAG, json.dumps(envelope))
        out.append((name, runs_url(base, exp.experiment_id)))
    return out


def _saved_state(tag: str | None) -> tuple[str, str] | None:
    try:
        envelope = json.loads(tag or "")
        return envelope["name"], envelope["state"]
    except (ValueError, KeyError, TypeError):
        return None
