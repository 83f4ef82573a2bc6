"""SQuAD Exact Match and F1, exactly as the official v1.1 evaluation script computes them.

``normalize_answer``, ``f1_score`` and ``exact_match_score`` are the official script's
functions (evaluate-v1.1.py, Rajpurkar et al. 2016), kept line for line so scores match it.
Each prediction is scored against every gold answer and the maximum kept; the mean is x 100.
``v2=True`` applies the v2.0 script's rule for unanswerable questions: a question with no
non-empty gold answer has the gold answer "", and an empty prediction or gold scores 1 only
when both are empty.
"""

import re
import string
from collections import Counter

import datasets
import evaluate


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def f1_score_v2(prediction: str, ground_truth: str) -> float:
    """The v2.0 script's compute_f1: empty on either side scores 1 only when both are empty."""
    if not normalize_answer(prediction).split() or not normalize_answer(ground_truth).split():
        return float(normalize_answer(prediction) == normalize_answer(ground_truth))
    return f1_score(prediction, ground_truth)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths: list[str]) -> float:  # noqa: ANN001
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def squad_scores(predictions: list[str], references: list[list[str]], v2: bool = False) -> dict[str, float]:
    """Both metrics; the official script's ``evaluate`` over aligned lists."""
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for pred, golds in zip(predictions, references, strict=True):
        if v2:
            golds = [g for g in golds if normalize_answer(g)] or [""]
        elif not golds:
            raise ValueError("a question without gold answers cannot be scored under SQuAD v1.1")
        em += metric_max_over_ground_truths(exact_match_score, pred, golds)
        f1 += metric_max_over_ground_truths(f1_score_v2 if v2 else f1_score, pred, golds)
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}


class Squad(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="SQuAD Exact Match / F1 (official v1.1 script); config name picks which.",
            citation="Rajpurkar et al. 2016, SQuAD: 100,000+ Questions for Machine Comprehension of Text",
            inputs_description="predictions: list of answer strings; references: list of lists of gold strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions: list[str], references: list[list[str]], v2: bool = False) -> dict[str, float]:
        scores = squad_scores(predictions, references, v2)
        if self.config_name in scores:
            return {self.config_name: scores[self.config_name]}
        return scores
