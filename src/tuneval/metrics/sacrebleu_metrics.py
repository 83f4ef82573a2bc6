"""Corpus BLEU and chrF with ``sacrebleu`` defaults (BLEU: 13a tokenisation, exp smoothing,
mixed case; chrF: character 6-grams, beta 2). Scores are sacrebleu's, on a 0-100 scale.
One reference per prediction. The signatures (what makes scores comparable) are recorded.
"""

import datasets
import evaluate
import sacrebleu


class SacreBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus-level BLEU or chrF (config name 'bleu' or 'chrf') with sacrebleu defaults.",
            citation="Post (2018), A Call for Clarity in Reporting BLEU Scores.",
            inputs_description="predictions, references: lists of strings, one reference per prediction",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        metric = sacrebleu.CHRF() if self.config_name == "chrf" else sacrebleu.BLEU()
        name = "chrf" if self.config_name == "chrf" else "bleu"
        return {name: float(metric.corpus_score(list(predictions), [list(references)]).score)}
