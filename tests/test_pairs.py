"""Pairwise comparisons in the report, from a fixture MLflow store written with tuneval's own Tracker and
SeedGroup: seed groups compared by a paired t over seeds (expected intervals computed here from scipy's t),
single-seed runs compared by a paired bootstrap over predictions.parquet artifacts matched by example_id."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import t as student_t
from sklearn.metrics import f1_score

from tuneval.reporting import example_ci, pairs, render, stats
from tuneval.reporting import rules as rp
from tuneval.reporting.publish import load, write
from tuneval.settings import Settings
from tuneval.tracking.client import Tracker
from tuneval.tracking.record import SeedGroup

CONFIG = """\
models:
  a: {source: org/a}
  b: {source: org/b}
  c: {source: org/c}
benchmarks:
  toy:
    problem: classification
    data: {files: {train: train.jsonl, test: test.jsonl}}
    metrics: [accuracy]
pipelines:
  duel: {models: [a, b, c], benchmarks: [toy], seeds: [1, 2, 3]}
"""
INV = "20260301T000000Z-cccccc"
# Three seeds per model on "multi": per-seed test metrics of the child runs.
SEEDS = (1, 2, 3)
MULTI = {
    "a": {"accuracy": [0.80, 0.82, 0.84], "perplexity": [12.0, 12.5, 14.0]},
    "b": {"accuracy": [0.70, 0.73, 0.74], "perplexity": [10.0, 11.0, 12.0]},
    "c": {"accuracy": [0.81, 0.80, 0.86], "perplexity": [12.1, 12.4, 14.2]},
}
# One seed per model on "single": predictions over N examples with 3 labels. a is right on 180,
# b on 100 (a subset of a's), c predicts exactly as b but its rows are logged in reverse order.
N = 200
LABELS = [i % 3 for i in range(N)]
PRED = {
    "a": [y if i < 180 else (y + 1) % 3 for i, y in enumerate(LABELS)],
    "b": [y if i < 100 else (y + 1) % 3 for i, y in enumerate(LABELS)],
}
PRED["c"] = PRED["b"]


def _t_interval(diffs: list[float]) -> tuple[float, float, float]:
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _seed_group(tracker: Tracker, s: Settings, model: str) -> None:
    group = SeedGroup(s, "duel", model, "multi", list(SEEDS))
    results = []
    for i, seed in enumerate(SEEDS):
        values = {name: vals[i] for name, vals in MULTI[model].items()}
        tags = {"tuneval.pipeline": "duel", "tuneval.model": model, "tuneval.benchmark": "multi"}
        tags |= {"tuneval.seed": str(seed), "tuneval.invocation": INV, "mlflow.parentRunId": group.run_id or ""}
        rid = tracker.start("duel", f"{model}__multi__seed{seed}", tags)
        tracker.log_metrics(rid, {f"test_{k}": v for k, v in values.items()})
        tracker.finish(rid, ok=True)
        results.append(
            {
                "pipeline": "duel",
                "model": model,
                "benchmark": "multi",
                "seed": seed,
                "status": "completed",
                "metrics": values,
            }
        )
    group.close(results)


def _single(tracker: Tracker, model: str, folder: Path) -> None:
    ids = [f"ex{i}" for i in range(N)]
    table = {"example_id": ids, "label": LABELS, "prediction": PRED[model]}
    if model == "c":  # another row order: the comparison must match rows by example_id
        table = {k: v[::-1] for k, v in table.items()}
    accuracy = sum(p == y for p, y in zip(PRED[model], LABELS, strict=True)) / N
    tags = {"tuneval.pipeline": "duel", "tuneval.model": model, "tuneval.benchmark": "single", "tuneval.seed": "1"}
    tags |= {"tuneval.invocation": INV, "tuneval.problem": "classification"}
    rid = tracker.start("duel", f"{model}__single__seed1", tags)
    f1 = f1_score(LABELS, PRED[model], average="macro", labels=[0, 1, 2], zero_division=0)
    tracker.log_metrics(rid, {"test_accuracy": accuracy, "test_f1": float(f1)})
    tracker.log_params(rid, {"data_info": {"label_names": ["x", "y", "z"]}})
    path = folder / model / "predictions.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table(table), str(path))
    tracker.log_artifact(rid, path, "predictions")
    tracker.finish(rid, ok=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> rp.Report:
    root = tmp_path_factory.mktemp("pairs-project")
    (root / "pipelines.yaml").write_text(CONFIG)
    s = dataclasses.replace(Settings.from_env(root), invocation=INV)
    tracker = Tracker(s.tracking_uri, s.artifact_root)
    for model in ("a", "b", "c"):
        _seed_group(tracker, s, model)
        _single(tracker, model, root / "preds")
    found = load(tracker, "duel", pairs=True)
    assert found is not None
    return found


def _pairs(report: rp.Report) -> dict[tuple[str, str, str, str], rp.Pair]:
    return {(p.benchmark, p.model_a, p.model_b, p.metric): p for p in report.pairs}


@pytest.mark.parametrize(
    ("a", "b", "metric", "verdict"),
    [
        ("a", "b", "accuracy", "better"),  # a - b = 0.10, 0.09, 0.10
        ("a", "b", "perplexity", "worse"),  # lower is better: b - a = -2, -1.5, -2
        ("a", "c", "accuracy", "not distinguishable"),  # -0.01, 0.02, -0.02
        ("a", "c", "perplexity", "not distinguishable"),  # 0.1, -0.1, 0.2
        ("b", "c", "accuracy", "worse"),
    ],
)
def test_seed_paired_t(report: rp.Report, a: str, b: str, metric: str, verdict: str) -> None:
    p = _pairs(report)["multi", a, b, metric]
    va, vb = MULTI[a][metric], MULTI[b][metric]
    sign = 1 if rp.higher_is_better(metric) else -1
    mean, low, high = _t_interval([sign * (x - y) for x, y in zip(va, vb, strict=True)])
    assert (p.better_by, p.ci_low, p.ci_high) == pytest.approx((mean, low, high))
    assert p.verdict == verdict and p.method == "paired t over 3 seeds"


def test_single_seed_paired_bootstrap(report: rp.Report) -> None:
    got = _pairs(report)
    # a right on 180 of 200, b on 100 of those: a is better by 0.40 accuracy.
    ab = got["single", "a", "b", "accuracy"]
    assert ab.better_by == pytest.approx(0.40) and ab.verdict == "better"
    assert ab.method == f"paired bootstrap over {N} examples"
    assert ab.ci_low is not None and ab.ci_high is not None and 0 < ab.ci_low < 0.40 < ab.ci_high
    # The per-example difference is 0/1 with p = 0.4: its mean's bootstrap CI is about +-1.96 sqrt(.24/200).
    half = 1.96 * math.sqrt(0.4 * 0.6 / N)
    assert ab.ci_low == pytest.approx(0.40 - half, abs=0.015) and ab.ci_high == pytest.approx(0.40 + half, abs=0.015)
    # Macro-F1 is recomputed from resampled per-class counts; its point difference is sklearn's.
    f1 = {m: f1_score(LABELS, PRED[m], average="macro", labels=[0, 1, 2], zero_division=0) for m in ("a", "b")}
    assert got["single", "a", "b", "f1"].better_by == pytest.approx(f1["a"] - f1["b"])
    assert got["single", "a", "b", "f1"].verdict == "better"
    # b and c predicted the same (c's rows in another order): difference 0, not distinguishable.
    for metric in ("accuracy", "f1"):
        bc = got["single", "b", "c", metric]
        assert (bc.better_by, bc.ci_low, bc.ci_high) == pytest.approx((0.0, 0.0, 0.0))
        assert bc.verdict == "not distinguishable"
    assert {(k[1], k[2]) for k in got if k[0] == "single"} == {("a", "b"), ("a", "c"), ("b", "c")}


def test_pairing_narrows_the_interval() -> None:
    """a is right on b's 100 examples plus 10 more: the unpaired CIs overlap, the paired one excludes 0."""
    n = 200
    b = [float(i < 100) for i in range(n)]
    a = [float(i < 110) for i in range(n)]
    diff, low, high = pairs.paired_decomposed(example_ci._mean(a), example_ci._mean(b), higher=True)
    assert diff == pytest.approx(0.05) and low is not None and high is not None and low > 0
    unpaired = [stats.bootstrap(x) for x in (a, b)]
    assert unpaired[1].ci_high > unpaired[0].ci_low  # independent intervals overlap
    # The same resampled rows for both: the paired bootstrap of per-example differences, another RNG layout.
    ref = stats.paired_bootstrap(a, b)
    assert (low, high) == pytest.approx((ref.ci_low, ref.ci_high), abs=0.015)
    # Lower is better: the sign flips, the verdict with it.
    diff, low, high = pairs.paired_decomposed(example_ci._mean(a), example_ci._mean(b), higher=False)
    assert diff == pytest.approx(-0.05) and high is not None and high < 0 and stats.verdict(low, high) == "worse"


def test_not_paired_reasons() -> None:
    """No predictions, or a metric with no per-example form: listed, not compared."""
    runs = []
    for model in ("a", "b"):
        tags = {"tuneval.model": model, "tuneval.benchmark": "t", "tuneval.seed": "1", "tuneval.invocation": "i"}
        tags["tuneval.problem"] = "classification"
        runs.append(
            {"run_id": model, "status": "FINISHED", "start_time": 1, "tags": tags}
            | {"metrics": {"test_accuracy": 0.5, "test_pretrained_perplexity": 9.0}}
        )
    report = rp.build("p", runs)
    assert report is not None
    none = {p.metric: p.verdict for p in pairs.compare(report, runs, lambda rid: None)}
    assert none == {"accuracy": "not paired (no predictions)", "pretrained_perplexity": "not paired (no predictions)"}
    table = {"example_id": ["1", "2", "3"], "label": [0, 1, 0], "prediction": [0, 1, 1]}
    found = {p.metric: p for p in pairs.compare(report, runs, lambda rid: (table, {}))}
    assert found["pretrained_perplexity"].verdict == "not paired (no per-example form)"
    assert found["accuracy"].verdict == "not distinguishable" and found["accuracy"].better_by == 0.0


def test_section_in_markdown_and_html(report: rp.Report, tmp_path: Path) -> None:
    paths = write(report, tmp_path)
    md, page = (p.read_text() for p in paths[:2])
    for text in (md, page):
        assert "Pairwise comparisons" in text
        assert "paired t over 3 seeds" in text and f"paired bootstrap over {N} examples" in text
        assert "not distinguishable" in text and "better" in text and "worse" in text
    row = next(line for line in md.splitlines() if line.startswith("| single | accuracy ↑ | a | b |"))
    assert "+0.4000" in row and "| better |" in row
    # Without two models on a benchmark there is no section.
    assert "Pairwise comparisons" not in render.markdown(dataclasses.replace(report, pairs=[]))
    assert np.isfinite([p.better_by for p in report.pairs if p.better_by is not None]).all()
