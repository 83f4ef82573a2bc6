"""ROUGE-1/2/L/Lsum F-measure with Google's ``rouge-score`` (what HF's ``rouge`` metric wraps).

As in the Hugging Face summarization example: Porter stemming on, and rougeLsum computed on
texts with one sentence per line. The example splits sentences with ``nltk.sent_tokenize``,
which needs the punkt model downloaded; this module uses a fixed regex instead (a sentence
ends at ., ! or ? followed by whitespace; existing newlines are kept), so it runs offline.
Scores are the mean of per-example F-measures, 0-1 (no bootstrap resampling, so deterministic).
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, for rougeLsum."""
    lines = [s.strip() for part in text.strip().split("\n") for s in SENTENCE_END.split(part)]
    return "\n".join(s for s in lines if s)


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE F-measure (stemmed); the config name picks one type, 'default' gives all four.",
            citation="Lin (2004), ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions, references: lists of strings, one reference per prediction",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        types = [self.config_name] if self.config_name in ROUGE_TYPES else list(ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
        totals = dict.fromkeys(types, 0.0)
        for pred, ref in zip(predictions, references, strict=True):
            if "rougeLsum" in types:
                pred, ref = split_sentences(pred), split_sentences(ref)
            for t, s in scorer.score(ref, pred).items():
                totals[t] += s.fmeasure
        n = max(len(predictions), 1)
        return {t: totals[t] / n for t in types}
