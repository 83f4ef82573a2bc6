"""Seq2seq metric modules: a hand-worked table, and equality with direct library calls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneval import metrics
from tuneval.metrics.rouge import split_sentences

CASES = json.loads((Path(__file__).parent / "fixtures" / "seq2seq_metrics.json").read_text())
TEXT_METRICS = ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf"]

# Realistic texts; the sentence lists are the hand-made split that rougeLsum must see.
PREDICTIONS = [
    "The council approved the new budget on Monday. Taxes will rise by two percent.",
    "A man was arrested after a car chase in Glasgow!",
    "Das Essen war kalt und der Service war langsam.",
]
REFERENCES = [
    "Councillors have approved a budget that raises council tax by 2%. The vote was held on Monday.",
    "Police arrested a driver following a chase through Glasgow city centre.",
    "Das Essen war kalt, und die Bedienung war sehr langsam.",
]
SENTENCES = [
    (
        ["The council approved the new budget on Monday.", "Taxes will rise by two percent."],
        ["Councillors have approved a budget that raises council tax by 2%.", "The vote was held on Monday."],
    ),
    (["A man was arrested after a car chase in Glasgow!"], REFERENCES[1:2]),
    (PREDICTIONS[2:3], REFERENCES[2:3]),
]


TABLE = [(c, m) for c in CASES for m in TEXT_METRICS if m in c["expected"]]


@pytest.mark.parametrize("case,metric", TABLE, ids=[f"{c['name']}-{m}" for c, m in TABLE])
def test_seq2seq_metric_table(case: dict, metric: str) -> None:
    got = metrics.load(metric).compute(predictions=case["predictions"], references=case["references"])
    assert got[metric] == pytest.approx(case["expected"][metric], abs=1e-9)


def test_rouge_equals_rouge_score_directly() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for pred, ref, (pred_sents, ref_sents) in zip(PREDICTIONS, REFERENCES, SENTENCES, strict=True):
        for k in ("rouge1", "rouge2", "rougeL"):
            direct[k] += scorer.score(ref, pred)[k].fmeasure / 3
        direct["rougeLsum"] += scorer.score("\n".join(ref_sents), "\n".join(pred_sents))["rougeLsum"].fmeasure / 3
    for k, expected in direct.items():
        got = metrics.load(k).compute(predictions=PREDICTIONS, references=REFERENCES)[k]
        assert got == pytest.approx(expected, abs=1e-12), k
    assert 0 < direct["rouge2"] < direct["rouge1"] < 1


def test_bleu_and_chrf_equal_sacrebleu_directly() -> None:
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES])
    chrf = sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES])
    assert metrics.load("bleu").compute(predictions=PREDICTIONS, references=REFERENCES)["bleu"] == bleu.score
    assert metrics.load("chrf").compute(predictions=PREDICTIONS, references=REFERENCES)["chrf"] == chrf.score
    assert 0 < bleu.score < 100 and 0 < chrf.score < 100


def test_settings_record_signatures_and_rouge_options() -> None:
    assert "tok:13a" in metrics.settings("bleu")["bleu_signature"]
    assert "nc:6" in metrics.settings("chrf")["chrf_signature"]
    assert metrics.settings("rougeLsum")["use_stemmer"] is True
    assert "regex" in metrics.settings("rougeLsum")["rougeLsum_sentences"]


def test_split_sentences() -> None:
    assert split_sentences(PREDICTIONS[0]) == "\n".join(SENTENCES[0][0])
    assert split_sentences("First line\nSecond one. Third?  Yes") == "First line\nSecond one.\nThird?\nYes"
    assert split_sentences("3.5 million people") == "3.5 million people"  # no space after the dot


@pytest.mark.parametrize(
    "nll,tokens,expected",
    [
        ([2.0, 4.0], [1, 3], math.exp(1.5)),  # per token over the corpus: 6 nats / 4 tokens
        ([3 * math.log(50)], [3], 50.0),  # uniform over 50 tokens -> perplexity 50
    ],
)
def test_perplexity(nll: list[float], tokens: list[int], expected: float) -> None:
    got = metrics.load("perplexity").compute(nll_sums=nll, token_counts=tokens)["perplexity"]
    assert got == pytest.approx(expected, rel=1e-12)


def test_score_reports_metrics_and_signature() -> None:
    from tuneval.problems.seq2seq import score

    table = {
        "example_id": ["a", "b"],
        "reference": ["the cat sat", "a dog ran"],
        "prediction": ["the cat sat", ""],
        "nll": [1.0, 2.0],
        "target_tokens": [2, 1],
    }
    results, report = score(table, ["rouge1", "bleu", "perplexity"], {"generation": None})
    assert results["rouge1"] == pytest.approx(0.5) and results["perplexity"] == pytest.approx(math.e)
    assert report["empty_predictions"] == 1 and "tok:13a" in report["bleu_signature"]
