"""One run's life: its MLflow record and its machine-readable result.

Everything logged comes from the stage artifacts, so a cached run is recorded as fully as a
fresh one (curves included), and "why did this stage run?" is answered by its key parts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneval.config.runs import RunSpec
from tuneval.pipeline.store import StageOutcome
from tuneval.settings import Settings
from tuneval.tracking import logged_model, notes
from tuneval.tracking.client import Tracker


@dataclass
class RunRecord:
    run: RunSpec
    tracker: Tracker | None
    settings: Settings | None = None
    mlflow_run_id: str | None = None
    model_id: str | None = None  # the fine-tuned model's MLflow LoggedModel (tracking.log_models)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    cis: dict[str, dict[str, float]] = field(default_factory=dict)  # the score stage's bootstrap CIs
    started: float = field(default_factory=time.time)

    @classmethod
    def open(
        cls, run: RunSpec, settings: Settings, flow_run_id: str | None = None, parent_run_id: str | None = None
    ) -> RunRecord:
        tracker = Tracker(settings.tracking_uri, settings.artifact_root) if settings.track else None
        record = cls(run=run, tracker=tracker, settings=settings)
        if tracker is not None:
            tags = {
                "tuneval.pipeline": run.pipeline,
                "tuneval.model": run.model_name,
                "tuneval.benchmark": run.benchmark_name,
                "tuneval.seed": str(run.seed),
                "tuneval.problem": run.benchmark.problem,
                "tuneval.invocation": settings.invocation,
                "prefect.flow_run_id": flow_run_id or "",
                # "none": every stage was cached, so the CLI recorded the run without starting Prefect.
                "tuneval.orchestrator": "prefect" if flow_run_id else "none",
                **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
            }
            record.mlflow_run_id = tracker.start(run.pipeline, run.run_name, tags)
            tracker.log_params(record.mlflow_run_id, run.params())
        return record

    def stage_done(self, stage: str, outcome: StageOutcome) -> None:
        self.stages[stage] = {"status": outcome.status, "seconds": round(outcome.seconds, 3), "key": outcome.ref.key}
        if stage in ("intrinsic", "score"):
            self.metrics.update(outcome.ref.meta()["metrics"])
        if self.tracker is None or self.mlflow_run_id is None:
            return
        t, rid, folder = self.tracker, self.mlflow_run_id, outcome.ref.dir
        t.set_tags(rid, {f"tuneval.stage.{stage}": outcome.status, f"tuneval.key.{stage}": outcome.ref.key})
        t.log_dict(rid, outcome.key_parts, f"cache_keys/{stage}.json")
        meta = outcome.ref.meta()
        if stage == "load":
            for split, info in meta["splits"].items():
                t.log_dataset(
                    rid,
                    f"{self.run.benchmark_name}/{split}",
                    outcome.ref.fingerprint,
                    info["source"],
                    split,
                    info["rows"],
                )
        elif stage == "prepare":
            t.log_params(
                rid,
                {
                    "data": {
                        s: {
                            "examples": m["examples"],
                            "rows": m["rows"],
                            "mean_tokens": round(m["mean_tokens"], 2),
                            "truncated": m["truncated"],
                        }
                        for s, m in meta["splits"].items()
                    },
                    "data_info": meta["info"],
                },
            )
        elif stage == "finetune":
            history = json.loads((folder / "history.json").read_text())
            t.log_series(
                rid, [(h["step"], {"train_loss": h["loss"], "learning_rate": h["learning_rate"]}) for h in history]
            )
            epochs = json.loads((folder / "epochs.json").read_text())
            t.log_series(rid, [(e["epoch"], {f"val_{k}": v for k, v in e.items() if k != "epoch"}) for e in epochs])
            t.log_metrics(
                rid,
                {
                    k: meta[k]
                    for k in (
                        "train_seconds",
                        "samples_per_second",
                        "real_tokens_per_second",
                        "trainable_parameters",
                        "total_parameters",  # artifacts made before these were recorded lack them
                        "model_bytes",
                    )
                    if k in meta
                },
            )
            t.set_tags(rid, {"tuneval.device": meta["device"], "tuneval.precision": meta["precision"]})
            if "fused_seeds" in meta:  # trained in one fused pass with these seeds
                t.set_tags(rid, {"tuneval.fused_seeds": ",".join(map(str, meta["fused_seeds"]))})
            if "dropout_masks" in meta:
                t.set_tags(rid, {"tuneval.dropout_masks": meta["dropout_masks"]})
            if self.run.tracking.log_models and self.settings is not None:
                self.model_id = logged_model.log_or_link(t.client, rid, self.run, self.settings, outcome)
        elif stage == "intrinsic":
            t.log_metrics(rid, {f"test_{k}": v for k, v in meta["metrics"].items()})
            t.log_artifact(rid, folder / "metrics.json", "intrinsic")
        elif stage == "predict":
            t.log_artifact(rid, folder / "predictions.parquet", "predictions")
        elif stage == "score":
            t.log_metrics(rid, {f"test_{k}": v for k, v in meta["metrics"].items()}, model_id=self.model_id)
            self.cis = meta.get("ci", {})
            cis = meta.get("ci", {})  # 95% bootstrap over test examples: test_<metric>_ci_low / _ci_high
            t.log_metrics(rid, {f"test_{k}_{end}": v for k, ci in cis.items() for end, v in ci.items()})
            t.log_dict(rid, meta["settings"], "metric_settings.json")
            t.log_params(rid, {"metric_settings": meta["settings"]})
            t.log_artifact(rid, folder / "report.json", "scores")
            t.log_artifact(rid, folder / "metrics.json", "scores")

    def fail(self, stage: str, error: BaseException) -> None:
        self.stages[stage] = {"status": "failed", "seconds": None, "key": None}
        self.error = str(error)
        if self.tracker is not None and self.mlflow_run_id is not None:
            tags = {"tuneval.failed_stage": stage, "tuneval.error": self.error}
            self.tracker.set_tags(self.mlflow_run_id, {**tags, notes.NOTE_TAG: notes.failed_note(stage, self.error)})
            self.tracker.finish(self.mlflow_run_id, ok=False)

    def close(self) -> None:
        if self.tracker is not None and self.mlflow_run_id is not None:
            cache = ",".join(f"{s}={v['status']}" for s, v in self.stages.items())
            note = notes.run_note(self.metrics, self.cis, self.run.benchmark.metrics)
            self.tracker.set_tags(self.mlflow_run_id, {"tuneval.cache": cache, notes.NOTE_TAG: note})
            self.tracker.finish(self.mlflow_run_id, ok=True)

    def result(self) -> dict[str, Any]:
        return {
            "pipeline": self.run.pipeline,
            "model": self.run.model_name,
            "benchmark": self.run.benchmark_name,
            "seed": self.run.seed,
            "status": "failed" if self.error else "completed",
            "mlflow_run_id": self.mlflow_run_id,
            "stages": self.stages,
            "metrics": self.metrics,
            "error": self.error,
            "seconds": round(time.time() - self.started, 3),
        }


def write_json(results: list[dict[str, Any]], path: str | Path) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps({"runs": results, "summaries": summarize(results)}, indent=1))
    tmp.replace(target)


def group_by_seeds(runs: list[RunSpec]) -> dict[tuple[str, str, str], list[RunSpec]]:
    """Runs that differ only by seed, in their original order."""
    groups: dict[tuple[str, str, str], list[RunSpec]] = {}
    for run in runs:
        groups.setdefault((run.pipeline, run.model_name, run.benchmark_name), []).append(run)
    return groups


def summarize(results: list[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per pipeline x model x benchmark: each test metric's mean, std and t-interval over seeds."""
    from tuneval.reporting.stats import over_seeds

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("status") == "completed":
            groups.setdefault((r["pipeline"], r["model"], r["benchmark"]), []).append(r)
    out = []
    for (pipeline, model, bench), runs in groups.items():
        names = sorted({k for r in runs for k in r["metrics"]})
        out.append(
            {
                "pipeline": pipeline,
                "model": model,
                "benchmark": bench,
                "seeds": [r["seed"] for r in runs],
                "metrics": {
                    n: over_seeds([r["metrics"][n] for r in runs if n in r["metrics"]], confidence).to_dict()
                    for n in names
                },
            }
        )
    return out


class SeedGroup:
    """The parent MLflow run of one model x benchmark's seeds: the children nest under it and it
    carries each test metric's mean, std and 95% t-interval over the seeds that completed."""

    def __init__(self, settings: Settings, pipeline: str, model: str, benchmark: str, seeds: list[int]):
        self.tracker = Tracker(settings.tracking_uri, settings.artifact_root) if settings.track else None
        self.run_id: str | None = None
        if self.tracker is not None:
            tags = {
                "tuneval.pipeline": pipeline,
                "tuneval.model": model,
                "tuneval.benchmark": benchmark,
                "tuneval.seeds": ",".join(map(str, seeds)),
                "tuneval.kind": "seed-group",
                "tuneval.invocation": settings.invocation,
            }
            self.run_id = self.tracker.start(pipeline, f"{model}__{benchmark}", tags)

    def close(self, results: list[dict[str, Any]]) -> None:
        if self.tracker is None or self.run_id is None:
            return
        groups = summarize(results)
        values: dict[str, float] = {"n_seeds": float(len(groups[0]["seeds"]) if groups else 0)}
        for group in groups:
            for name, s in group["metrics"].items():
                values.update({f"test_{name}_mean": s["mean"], f"test_{name}_std": s["std"]})
                if s["ci_low"] is not None:
                    values.update({f"test_{name}_ci_low": s["ci_low"], f"test_{name}_ci_high": s["ci_high"]})
        self.tracker.log_metrics(self.run_id, values)
        self.tracker.log_dict(self.run_id, groups, "seed_summary.json")
        if groups:  # the seeds' metrics in the order their runs scored them (the benchmark's)
            order = next((list(r["metrics"]) for r in results if r.get("metrics")), [])
            self.tracker.set_tags(self.run_id, {notes.NOTE_TAG: notes.group_note(groups[0], order, len(results))})
        self.tracker.finish(self.run_id, ok=all(r.get("status") == "completed" for r in results))
