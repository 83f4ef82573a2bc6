"""The leaderboard and its regression check, as pure functions of the runs MLflow holds.

Input: a pipeline's runs as plain dicts (``Tracker.pipeline_runs``: run_id, status, start_time,
tags, metrics). Output: one ``Entry`` per model x benchmark of the latest ``tuneval run``
(tag ``tuneval.invocation``), each compared with the same model x benchmark in the most recent
earlier invocation that has it, and the Markdown / HTML text. No MLflow, no files here.

Regression rule: a metric regressed when it got worse (down, or up for perplexity/loss) by more
than ``sqrt(h_prev**2 + h_new**2)``, the two 95% CI half-widths combined in quadrature: the
normal-approximation 95% CI half-width of the difference of two independent estimates. With a CI on
one side only, that side's half-width; with none, the change is not judged ("no CI").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

LOWER_IS_BETTER = ("perplexity", "loss")  # metric-name suffixes; every other metric is higher-is-better
CI_SUFFIXES = ("_ci_low", "_ci_high", "_std", "_mean")


def higher_is_better(metric: str) -> bool:
    return not metric.endswith(LOWER_IS_BETTER)


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci_low: float | None = None
    ci_high: float | None = None
    method: str = "none"  # "t" over seeds, "bootstrap" over test examples, "none"

    @property
    def half(self) -> float | None:
        """Half the CI's width (bootstrap intervals need not be symmetric about the mean)."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2


@dataclass(frozen=True)
class Entry:
    """One model x benchmark of one invocation: the seed-group parent run, or the single run."""

    pipeline: str
    model: str
    benchmark: str
    invocation: str
    run_id: str
    started: int  # ms since the epoch (MLflow's start_time)
    seeds: tuple[int, ...]
    n_seeds: int
    stages_ran: tuple[str, ...]  # stages that executed in any of its runs; empty = all cached
    metrics: dict[str, Estimate] = field(default_factory=dict)

    @property
    def cache(self) -> str:
        return "cached" if not self.stages_ran else "ran: " + ", ".join(self.stages_ran)


@dataclass(frozen=True)
class Change:
    model: str
    benchmark: str
    metric: str
    previous: Estimate
    latest: Estimate
    previous_run_id: str
    latest_run_id: str
    worse_by: float  # > 0: the latest is worse, in the metric's own direction
    threshold: float | None  # None: neither side has a CI

    @property
    def regressed(self) -> bool:
        return self.threshold is not None and self.worse_by > self.threshold

    @property
    def verdict(self) -> str:
        if self.threshold is None:
            return "no CI"
        if self.regressed:
            return "REGRESSION"
        return "improved" if -self.worse_by > self.threshold else "within CI"


@dataclass(frozen=True)
class Pair:
    """Model a against model b on one benchmark x metric of the latest invocation (see ``pairs.py``)."""

    benchmark: str
    model_a: str
    model_b: str
    metric: str
    better_by: float | None  # a - b, negated for lower-is-better metrics: > 0 means a is better
    ci_low: float | None  # 95% CI of better_by
    ci_high: float | None
    verdict: str  # "better" | "worse" | "not distinguishable" (a against b) | "not paired (<why>)"
    method: str  # "paired t over N seeds" | "paired bootstrap over N examples" | "-"


@dataclass(frozen=True)
class Report:
    pipeline: str
    latest: list[Entry]
    changes: list[Change]
    invocation: str
    previous_invocations: tuple[str, ...]
    pairs: list[Pair] = field(default_factory=list)  # filled by pairs.compare (needs per-seed runs, predictions)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regressed]


def compare(previous: Estimate, latest: Estimate, metric: str) -> tuple[float, float | None]:
    """(how much worse the latest is, the threshold it must exceed to be a regression)."""
    worse = previous.mean - latest.mean if higher_is_better(metric) else latest.mean - previous.mean
    halves = [h for h in (previous.half, latest.half) if h is not None]
    return worse, (math.sqrt(sum(h * h for h in halves)) if halves else None)


def entries(pipeline: str, runs: list[dict[str, Any]]) -> list[Entry]:
    """Seed-group parents and runs without a parent, of any invocation; children feed their parent's
    cache column. Runs logged before invocation ids existed are skipped."""
    children: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if parent := r["tags"].get("mlflow.parentRunId"):
            children.setdefault(parent, []).append(r)
    out = []
    for r in runs:
        tags, inv = r["tags"], r["tags"].get("tuneval.invocation")
        if not inv or "mlflow.parentRunId" in tags or r["status"] == "RUNNING":
            continue
        group = tags.get("tuneval.kind") == "seed-group"
        if group:
            metrics = _group_metrics(r["metrics"])
            n = int(r["metrics"].get("n_seeds", 0))
            seeds = tuple(int(s) for s in tags.get("tuneval.seeds", "").split(",") if s)
            kids = children.get(r["run_id"], [])
            cache_tags = [c["tags"].get("tuneval.cache", "") for c in kids]
            done = [c for c in kids if c["status"] == "FINISHED"]
            if n == 1 and len(done) == 1:  # one seed survived: its bootstrap CI, as for a one-seed run
                metrics = _single_metrics(done[0]["metrics"]) or metrics
        else:
            if r["status"] != "FINISHED":
                continue
            metrics = _single_metrics(r["metrics"])
            n, seeds = 1, (int(tags["tuneval.seed"]),) if tags.get("tuneval.seed") else ()
            cache_tags = [tags.get("tuneval.cache", "")]
        if not metrics or n == 0:
            continue
        out.append(
            Entry(
                pipeline=pipeline,
                model=tags.get("tuneval.model", "?"),
                benchmark=tags.get("tuneval.benchmark", "?"),
                invocation=inv,
                run_id=r["run_id"],
                started=int(r["start_time"] or 0),
                seeds=seeds,
                n_seeds=n,
                stages_ran=_stages_ran(cache_tags),
                metrics=metrics,
            )
        )
    return out


def _group_metrics(values: dict[str, float]) -> dict[str, Estimate]:
    names = sorted(k[5:-5] for k in values if k.startswith("test_") and k.endswith("_mean"))
    return {
        n: Estimate(
            values[f"test_{n}_mean"],
            values.get(f"test_{n}_ci_low"),
            values.get(f"test_{n}_ci_high"),
            "t" if f"test_{n}_ci_low" in values else "none",
        )
        for n in names
    }


def _single_metrics(values: dict[str, float]) -> dict[str, Estimate]:
    names = sorted(k[5:] for k in values if k.startswith("test_") and not k.endswith(CI_SUFFIXES))
    return {
        n: Estimate(
            values[f"test_{n}"],
            values.get(f"test_{n}_ci_low"),
            values.get(f"test_{n}_ci_high"),
            "bootstrap" if f"test_{n}_ci_low" in values else "none",
        )
        for n in names
    }


def _stages_ran(cache_tags: list[str]) -> tuple[str, ...]:
    ran: list[str] = []
    for tag in cache_tags:
        for part in filter(None, tag.split(",")):
            stage, _, status = part.partition("=")
            if status != "cached" and stage not in ran:
                ran.append(stage)
    return tuple(ran)


def build(pipeline: str, runs: list[dict[str, Any]]) -> Report | None:
    """The latest invocation's entries and their changes since the previous one (None: no entries)."""
    found = entries(pipeline, runs)
    if not found:
        return None
    started: dict[str, int] = {}
    for e in found:
        started[e.invocation] = min(started.get(e.invocation, e.started), e.started)
    order = sorted(started, key=lambda inv: (started[inv], inv))
    latest_inv = order[-1]
    latest = sorted((e for e in found if e.invocation == latest_inv), key=lambda e: (e.benchmark, e.model))
    changes: list[Change] = []
    used: list[str] = []
    for e in latest:
        earlier = [p for p in found if (p.model, p.benchmark) == (e.model, e.benchmark) and p.invocation != latest_inv]
        if not earlier:
            continue
        prev = max(earlier, key=lambda p: (started[p.invocation], p.invocation))
        if prev.invocation not in used:
            used.append(prev.invocation)
        for name, est in e.metrics.items():
            if name in prev.metrics:
                worse, threshold = compare(prev.metrics[name], est, name)
                changes.append(
                    Change(e.model, e.benchmark, name, prev.metrics[name], est, prev.run_id, e.run_id, worse, threshold)
                )
    return Report(pipeline, latest, changes, latest_inv, tuple(used))
