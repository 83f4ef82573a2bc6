"""The report asks MLflow for what it needs (server-side filter_string / order_by) instead of every
run: on a store of many invocations, the report built from those runs equals the one built from all
runs, and the trend holds exactly the last K invocations, each model's mean and CI per invocation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tuneval.reporting import publish, trend
from tuneval.reporting import rules as rp
from tuneval.settings import Settings
from tuneval.tracking import queries
from tuneval.tracking.client import Tracker
from tuneval.tracking.record import SeedGroup

N_INV = 7


def _inv(i: int) -> str:
    return f"2026010{i}T000000Z-00000{i}"


def _accuracy(model: str, i: int, seed: int) -> float:
    return 0.5 + 0.03 * i + (0.1 if model == "m1" else 0.0) + 0.01 * seed


def _single(tracker: Tracker, inv: str, model: str, bench: str, seed: int, value: float, parent: str | None) -> None:
    tags = {"tuneval.pipeline": "nightly", "tuneval.model": model, "tuneval.benchmark": bench}
    tags |= {"tuneval.seed": str(seed), "tuneval.invocation": inv, "tuneval.cache": "finetune=ran"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    rid = tracker.start("nightly", f"{model}__{bench}__seed{seed}", tags)
    tracker.log_metrics(rid, {"test_accuracy": value, "test_accuracy_ci_low": value - 0.02})
    tracker.log_metrics(rid, {"test_accuracy_ci_high": value + 0.02})
    tracker.finish(rid, ok=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Seven invocations: m1 on toy with three seeds (a group), m2 on toy with one seed; m3 on other
    runs only in invocations 0 and 6 (so its previous entry lies beyond a short history window)."""
    settings = Settings.from_env(tmp_path_factory.mktemp("queries"))
    for i in range(N_INV):
        s = dataclasses.replace(settings, invocation=_inv(i))
        tracker = Tracker(s.tracking_uri, s.artifact_root)
        group = SeedGroup(s, "nightly", "m1", "toy", [1, 2, 3])
        results = []
        for seed in (1, 2, 3):
            _single(tracker, s.invocation, "m1", "toy", seed, _accuracy("m1", i, seed), group.run_id)
            results.append(
                {"pipeline": "nightly", "model": "m1", "benchmark": "toy", "seed": seed}
                | {"status": "completed", "metrics": {"accuracy": _accuracy("m1", i, seed)}}
            )
        group.close(results)
        _single(tracker, s.invocation, "m2", "toy", 1, _accuracy("m2", i, 1), None)
        if i in (0, N_INV - 1):
            _single(tracker, s.invocation, "m3", "other", 1, 0.9 - 0.3 * (i > 0), None)
    return settings


def _tracker(settings: Settings) -> Tracker:
    return Tracker(settings.tracking_uri, settings.artifact_root)


@pytest.mark.parametrize("history", [2, 3, 10])
def test_filtered_runs_give_the_report_of_all_runs(store: Settings, history: int) -> None:
    tracker = _tracker(store)
    every = tracker.pipeline_runs("nightly") or []
    fetched = publish.fetch(tracker, "nightly", history) or []
    assert len(fetched) < len(every) or history >= N_INV
    full, part = rp.build("nightly", every), rp.build("nightly", fetched)
    assert full is not None and part is not None
    assert part.invocation == full.invocation == _inv(N_INV - 1)
    assert part.latest == full.latest and part.changes == full.changes
    assert part.previous_invocations == full.previous_invocations
    # m3's previous entry is six invocations back: found by its own query, and it regressed (0.9 -> 0.6).
    [m3] = [c for c in part.changes if c.model == "m3"]
    assert m3.previous.mean == pytest.approx(0.9) and m3.regressed


def test_trend_holds_the_last_k_invocations(store: Settings, tmp_path: Path) -> None:
    tracker = _tracker(store)
    report, runs = publish.load_with_runs(tracker, "nightly", history=4)
    points = trend.points(rp.entries("nightly", runs), 4)
    assert sorted({p.invocation for p in points}) == [_inv(i) for i in range(N_INV - 4, N_INV)]
    m1 = {p.invocation: p.estimate for p in points if p.model == "m1"}
    for i in range(N_INV - 4, N_INV):
        values = [_accuracy("m1", i, s) for s in (1, 2, 3)]
        assert m1[_inv(i)].mean == pytest.approx(sum(values) / 3)
        assert m1[_inv(i)].ci_low < m1[_inv(i)].mean < m1[_inv(i)].ci_high  # the t-interval over seeds
    m2 = {p.invocation: p.estimate for p in points if p.model == "m2"}
    assert m2[_inv(N_INV - 1)].ci_low == pytest.approx(_accuracy("m2", N_INV - 1, 1) - 0.02)
    png = trend.write_png("nightly", points, tmp_path / "trend.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_supersede_closes_only_that_groups_running_runs(store: Settings) -> None:
    tracker = _tracker(store)
    tags = {"tuneval.model": "m9", "tuneval.benchmark": "toy", "tuneval.invocation": "inv-x"}
    crashed = tracker.start("nightly", "m9__toy__seed1", tags)
    other = tracker.start("nightly", "m9__toy__seed1", {**tags, "tuneval.invocation": "inv-y"})
    assert queries.supersede(tracker, "nightly", "m9", "toy", "inv-x") == [crashed]
    assert tracker.client.get_run(crashed).info.status == "KILLED"
    assert tracker.client.get_run(crashed).data.tags["tuneval.superseded"] == "true"
    assert tracker.client.get_run(other).info.status == "RUNNING"
    tracker.finish(other, ok=True)
