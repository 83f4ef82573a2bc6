"""Leaderboard and regression alerts from a fixture MLflow store written with tuneval's own Tracker
and SeedGroup: two `tuneval run` invocations with hand-chosen metrics, one metric per model dropping
beyond its CI and one within it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from scipy.stats import t as student_t

from tuneval.cli.commands import REGRESSION_EXIT
from tuneval.cli.main import main
from tuneval.reporting import render
from tuneval.reporting import rules as rp
from tuneval.reporting.publish import flag_after_run
from tuneval.settings import Settings
from tuneval.tracking.client import Tracker
from tuneval.tracking.record import SeedGroup

CONFIG = """\
models:
  m1: {source: org/m1}
  m2: {source: org/m2}
benchmarks:
  toy:
    problem: classification
    data: {files: {train: train.jsonl, test: test.jsonl}}
    metrics: [accuracy]
pipelines:
  nightly: {models: [m1, m2], benchmarks: [toy], seeds: [1, 2, 3]}
  other: {models: [m1], benchmarks: [toy], seeds: [1]}
"""
INV = ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb")
# m1: three seeds (a seed-group parent with t-intervals); m2: one seed with a bootstrap CI.
M1 = {
    INV[0]: {"accuracy": [0.80, 0.82, 0.84], "perplexity": [10.0, 10.5, 11.0]},
    INV[1]: {"accuracy": [0.70, 0.72, 0.74], "perplexity": [10.6, 11.1, 11.6]},
}
M2 = {  # metric: (value, ci_low, ci_high)
    INV[0]: {"accuracy": (0.70, 0.66, 0.74), "perplexity": (20.0, 19.0, 21.0)},
    INV[1]: {"accuracy": (0.66, 0.63, 0.69), "perplexity": (24.0, 23.0, 25.0)},
}


def t_half(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def _write_invocation(settings: Settings, inv: str) -> None:
    s = dataclasses.replace(settings, invocation=inv)
    tracker = Tracker(s.tracking_uri, s.artifact_root)
    group = SeedGroup(s, "nightly", "m1", "toy", [1, 2, 3])
    results = []
    for i, seed in enumerate([1, 2, 3]):
        values = {name: vals[i] for name, vals in M1[inv].items()}
        tags = {"tuneval.pipeline": "nightly", "tuneval.model": "m1", "tuneval.benchmark": "toy"}
        tags |= {"tuneval.seed": str(seed), "tuneval.invocation": inv, "mlflow.parentRunId": group.run_id or ""}
        tags["tuneval.cache"] = "load=cached,prepare=cached,finetune=ran,predict=ran,score=ran"
        rid = tracker.start("nightly", f"m1__toy__seed{seed}", tags)
        tracker.log_metrics(rid, {f"test_{k}": v for k, v in values.items()})
        tracker.finish(rid, ok=True)
        results.append(
            {"pipeline": "nightly", "model": "m1", "benchmark": "toy", "seed": seed, "status": "completed"}
            | {"metrics": values}
        )
    group.close(results)
    tags = {"tuneval.pipeline": "nightly", "tuneval.model": "m2", "tuneval.benchmark": "toy", "tuneval.seed": "1"}
    tags |= {"tuneval.invocation": inv, "tuneval.cache": ",".join(f"{s}=cached" for s in ("load", "prepare", "score"))}
    rid = tracker.start("nightly", "m2__toy__seed1", tags)
    for name, (v, low, high) in M2[inv].items():
        tracker.log_metrics(rid, {f"test_{name}": v, f"test_{name}_ci_low": low, f"test_{name}_ci_high": high})
    tracker.finish(rid, ok=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("report-project")
    (root / "pipelines.yaml").write_text(CONFIG)
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text('{"text": "a", "label": 0}\n')
    settings = Settings.from_env(root)
    for inv in INV:
        _write_invocation(settings, inv)
    return dataclasses.replace(settings, invocation=INV[1])


def _report(settings: Settings) -> rp.Report:
    tracker = Tracker(settings.tracking_uri, settings.artifact_root)
    report = rp.build("nightly", tracker.pipeline_runs("nightly") or [])
    assert report is not None
    return report


def test_compare_boundaries() -> None:
    """Worse by just under / just over the quadrature threshold, both directions, one-sided and no CI."""
    h1, h2 = 0.03, 0.04  # threshold 0.05
    prev, eps = rp.Estimate(0.80, 0.80 - h1, 0.80 + h1), 1e-6
    cases = [
        ("accuracy", rp.Estimate(0.75 + eps, 0.75 + eps - h2, 0.75 + eps + h2), False),
        ("accuracy", rp.Estimate(0.75 - eps, 0.75 - eps - h2, 0.75 - eps + h2), True),
        ("accuracy", rp.Estimate(0.90, 0.90 - h2, 0.90 + h2), False),  # better, not worse
        ("perplexity", rp.Estimate(0.85 - eps, 0.85 - eps - h2, 0.85 - eps + h2), False),  # lower is better
        ("perplexity", rp.Estimate(0.85 + eps, 0.85 + eps - h2, 0.85 + eps + h2), True),
        ("perplexity", rp.Estimate(0.70, 0.70 - h2, 0.70 + h2), False),
        ("val_loss", rp.Estimate(0.85 + eps, 0.85 + eps - h2, 0.85 + eps + h2), True),
        ("accuracy", rp.Estimate(0.77 - eps), True),  # no CI on the latest: the previous half-width alone
        ("accuracy", rp.Estimate(0.77 + eps), False),
    ]
    for metric, latest, flagged in cases:
        worse, threshold = rp.compare(prev, latest, metric)
        change = rp.Change("m", "b", metric, prev, latest, "p", "l", worse, threshold)
        assert change.regressed is flagged, (metric, latest, worse, threshold)
    worse, threshold = rp.compare(rp.Estimate(0.8), rp.Estimate(0.1), "accuracy")
    assert threshold is None and worse == pytest.approx(0.7)
    assert rp.Change("m", "b", "accuracy", rp.Estimate(0.8), rp.Estimate(0.1), "p", "l", worse, None).verdict == "no CI"


def test_regressions_from_store(store: Settings) -> None:
    report = _report(store)
    assert report.invocation == INV[1] and report.previous_invocations == (INV[0],)
    verdicts = {(c.model, c.metric): c for c in report.changes}
    # m1 accuracy: 0.82 -> 0.72 with equal t half-widths h: worse by 0.10 > sqrt(2) h.
    h = t_half(M1[INV[1]]["accuracy"])
    assert verdicts["m1", "accuracy"].threshold == pytest.approx(math.sqrt(2) * h)
    assert verdicts["m1", "accuracy"].worse_by == pytest.approx(0.10) and 0.10 > math.sqrt(2) * h
    # m1 perplexity 10.5 -> 11.1 (lower is better): worse by 0.6, within sqrt(2) * 1.242.
    assert verdicts["m1", "perplexity"].verdict == "within CI"
    # m2 accuracy 0.70 -> 0.66: worse by 0.04 < sqrt(0.04^2 + 0.03^2) = 0.05.
    assert verdicts["m2", "accuracy"].threshold == pytest.approx(0.05)
    assert verdicts["m2", "accuracy"].verdict == "within CI"
    # m2 perplexity 20 -> 24, half-widths 1 and 1: worse by 4 > sqrt(2).
    assert verdicts["m2", "perplexity"].regressed
    assert {(c.model, c.metric) for c in report.regressions} == {("m1", "accuracy"), ("m2", "perplexity")}
    seeds = {e.model: (e.seeds, e.n_seeds, e.cache) for e in report.latest}
    assert seeds == {"m1": ((1, 2, 3), 3, "ran: finetune, predict, score"), "m2": ((1,), 1, "cached")}


def test_markdown_has_mean_and_ci(store: Settings) -> None:
    md = render.markdown(_report(store))
    acc = M1[INV[1]]["accuracy"]
    assert f"{sum(acc) / 3:.4f} ± {t_half(acc):.4f}" in md  # 0.7200 ± 0.0497
    ppl = M1[INV[1]]["perplexity"]
    assert f"{sum(ppl) / 3:.2f} ± {t_half(ppl):.2f}" in md  # 11.10 ± 1.24
    assert "0.6600 ± 0.0300" in md and "24.00 ± 1.00" in md  # the single seed's bootstrap CI
    assert "| m1 | toy | accuracy ↑ |" in md and "REGRESSION" in md and "t over 3 seeds" in md


def test_cli_report_files_tags_exit_codes(store: Settings, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = str(store.project_dir / "pipelines.yaml")
    out = tmp_path / "out"
    assert main(["report", "nightly", "--config", cfg, "--out", str(out), "--fail-on-regression"]) == REGRESSION_EXIT
    printed = capsys.readouterr()
    assert "regression: nightly: m1/toy/accuracy" in printed.err and "m2/toy/perplexity" in printed.err
    assert "| model | toy accuracy ↑ | toy perplexity ↓ |" in printed.out
    folder = out / "nightly"
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in (folder / "report.html").read_text() and (folder / "report.md").read_text().startswith("#")

    tracker = Tracker(store.tracking_uri, store.artifact_root)
    report = _report(store)
    tags = {e.model: tracker.client.get_run(e.run_id).data.tags for e in report.latest}
    assert tags["m1"]["tuneval.regression"] == "true" and tags["m1"]["tuneval.regressed_metrics"] == "accuracy"
    assert tags["m2"]["tuneval.regressed_metrics"] == "perplexity"
    logged = {f.path for f in tracker.client.list_artifacts(report.latest[0].run_id, "report")}
    assert logged == {"report/report.md", "report/report.html", "report/report.png", "report/trend.png"}
    assert (folder / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![the last invocations](trend.png)" in (folder / "report.md").read_text()

    # Without the flag a regression is reported but the exit code stays 0; all pipelines by default.
    assert main(["report", "--config", cfg, "--out", str(out)]) == 0
    assert not (out / "other").exists()  # declared but never run: skipped when no name is given


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "nope"], "no pipeline named 'nope'"),
        (["report", "other"], "pipeline 'other' has no tracked runs"),
    ],
)
def test_cli_user_errors(store: Settings, argv: list[str], message: str, capsys) -> None:
    assert main([*argv, "--config", str(store.project_dir / "pipelines.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_empty_store_is_a_user_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "pipelines.yaml").write_text(CONFIG)
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a", "label": 0}\n')
    assert main(["report", "--config", str(tmp_path / "pipelines.yaml")]) == 2
    assert "no tracked runs of any pipeline" in capsys.readouterr().err


def test_flag_after_run_tags_only_its_own_invocation(store: Settings) -> None:
    tracker = Tracker(store.tracking_uri, store.artifact_root)
    report = _report(store)
    for e in report.latest:
        tracker.set_tags(e.run_id, {"tuneval.regression": "unset"})
    stale = dataclasses.replace(store, invocation=INV[0])  # not the latest run: leaves tags alone
    assert flag_after_run(stale, ["nightly"]) == []
    assert {tracker.client.get_run(e.run_id).data.tags["tuneval.regression"] for e in report.latest} == {"unset"}
    found = flag_after_run(store, ["nightly"])
    assert {(c.model, c.metric) for c in found} == {("m1", "accuracy"), ("m2", "perplexity")}
    assert {tracker.client.get_run(e.run_id).data.tags["tuneval.regression"] for e in report.latest} == {"true"}


def _run(rid: str, status: str, tags: dict[str, str], metrics: dict[str, float], start: int = 1) -> dict:
    base = {"tuneval.invocation": "i1", "tuneval.model": "m", "tuneval.benchmark": "b"}
    return {"run_id": rid, "status": status, "start_time": start, "tags": base | tags, "metrics": metrics}


def test_entries_edge_cases() -> None:
    """A group where one seed of two survived takes that seed's bootstrap CI; runs still running, failed
    single runs, and runs logged before invocation ids are not entries."""
    group = {"tuneval.kind": "seed-group", "tuneval.seeds": "1,2"}
    runs = [
        _run("g", "FAILED", group, {"n_seeds": 1, "test_accuracy_mean": 0.8, "test_accuracy_std": 0.0}),
        _run("c1", "FINISHED", {"mlflow.parentRunId": "g", "tuneval.seed": "1", "tuneval.cache": "score=ran"}, {})
        | {"metrics": {"test_accuracy": 0.8, "test_accuracy_ci_low": 0.7, "test_accuracy_ci_high": 0.86}},
        _run("c2", "FAILED", {"mlflow.parentRunId": "g", "tuneval.seed": "2"}, {}),
        _run("running", "RUNNING", {"tuneval.model": "m2", "tuneval.seed": "1"}, {"test_accuracy": 0.5}),
        _run("failed", "FAILED", {"tuneval.model": "m3", "tuneval.seed": "1"}, {"test_accuracy": 0.5}),
        _run("old", "FINISHED", {"tuneval.invocation": "", "tuneval.model": "m4"}, {"test_accuracy": 0.5}),
    ]
    [entry] = rp.entries("p", runs)
    assert (entry.run_id, entry.seeds, entry.n_seeds, entry.cache) == ("g", (1, 2), 1, "ran: score")
    assert entry.metrics["accuracy"] == rp.Estimate(0.8, 0.7, 0.86, "bootstrap")
    assert entry.metrics["accuracy"].half == pytest.approx(0.08)
    assert render.mean_ci(entry.metrics["accuracy"]) == "0.8000 ± 0.0800"
    assert rp.build("p", runs[3:]) is None
