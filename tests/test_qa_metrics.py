"""SQuAD EM/F1 on hand-worked cases (a table, lighteval style), checked against the official rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneval import metrics

CASES = json.loads((Path(__file__).parent / "fixtures" / "squad_metrics.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("metric", ["exact_match", "f1"])
def test_squad_metric_table(case: dict, metric: str) -> None:
    got = metrics.load(metric, "extractive_qa").compute(
        predictions=case["predictions"], references=case["references"], v2=case.get("v2", False)
    )
    assert got == {metric: pytest.approx(case["expected"][metric], abs=1e-9)}


def test_qa_f1_is_not_the_classification_f1() -> None:
    assert metrics.settings("f1", "extractive_qa")["module"] == "tuneval.metrics.squad"
    assert metrics.settings("f1")["module"] == "tuneval.metrics.macro_prf"
    assert "official SQuAD" in metrics.settings("exact_match", "extractive_qa")["library"]


def test_squad_module_loads_through_evaluate_offline() -> None:
    import evaluate

    metric = evaluate.load(str(Path(metrics.__file__).parent / "squad.py"), config_name="f1")
    assert metric.compute(predictions=["the cat"], references=[["a cat sat"]])["f1"] == pytest.approx(200 / 3)


def test_v1_question_without_gold_is_refused() -> None:
    from tuneval.metrics.squad import squad_scores

    with pytest.raises(ValueError, match="without gold answers"):
        squad_scores(["x"], [[]])
