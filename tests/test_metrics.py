"""Metric modules on hand-computed cases (a table, lighteval style) and offline loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneval import metrics

CASES = json.loads((Path(__file__).parent / "fixtures" / "classification_metrics.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("metric", ["accuracy", "f1", "precision", "recall"])
def test_classification_metric_table(case: dict, metric: str) -> None:
    kwargs = {"labels": case["labels"]} if "labels" in case and metric != "accuracy" else {}
    got = metrics.load(metric).compute(predictions=case["predictions"], references=case["references"], **kwargs)
    assert got[metric] == pytest.approx(case["expected"][metric], abs=1e-12)


def test_modules_load_through_evaluate_offline() -> None:
    import evaluate

    path = Path(metrics.__file__).parent / "accuracy.py"
    metric = evaluate.load(str(path))
    assert metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])["accuracy"] == pytest.approx(2 / 3)


def test_settings_are_recorded_per_metric() -> None:
    assert metrics.settings("f1")["average"] == "macro"
    assert "scikit-learn" in metrics.settings("accuracy")["library"]


def test_score_adds_per_class_report() -> None:
    from tuneval.problems.classification import score

    results, report = score(
        {"label": [0, 0, 1, 1], "prediction": [0, 1, 1, 1]}, ["accuracy", "f1"], {"label_names": ["neg", "pos"]}
    )
    assert results["accuracy"] == 0.75
    assert report["confusion_matrix"] == [[1, 1], [0, 2]]
    assert report["per_class"]["pos"]["recall"] == 1.0
