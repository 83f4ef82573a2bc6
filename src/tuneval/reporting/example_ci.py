"""95% percentile-bootstrap intervals of test metrics over test examples (the CI of a one-seed run).

Each metric is written as per-example statistics whose column sums give the corpus value
(``stats``, ``value``): accuracy, SQuAD EM/F1 and ROUGE are means of per-example scores;
macro P/R/F1 are functions of per-class TP / predicted / true counts; perplexity is
exp(sum NLL / sum tokens); BLEU and chrF use sacrebleu's sufficient statistics. A resample draws
test rows with replacement (multinomial counts) and recomputes the metric from the summed rows,
so the interval is that of the corpus-level metric, not of a per-example mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

CHUNK = 100
Decomposed = tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]  # (N x k stats, sums R x k -> R values)


def _mean(per_example: list[float]) -> Decomposed:
    x = np.asarray(per_example, dtype=float)[:, None]
    n = len(x)
    return x, lambda sums: sums[:, 0] / n


def _macro(refs: list[int], preds: list[int], n_labels: int, which: str) -> Decomposed:
    """sklearn's macro average over every label id, zero_division=0."""
    r, p = np.asarray(refs), np.asarray(preds)
    eye = np.eye(n_labels)
    tp, pred, true = eye[p] * (r == p)[:, None], eye[p], eye[r]
    stats = np.concatenate([tp, pred, true], axis=1)

    def value(sums: np.ndarray) -> np.ndarray:
        tp, pred, true = np.split(sums, 3, axis=1)
        num = {"precision": tp, "recall": tp, "f1": 2 * tp}[which]
        den = {"precision": pred, "recall": true, "f1": pred + true}[which]
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0).mean(axis=1)

    return stats, value


def _perplexity(nll: list[float], tokens: list[int]) -> Decomposed:
    stats = np.stack([np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)], axis=1)
    return stats, lambda sums: np.exp(sums[:, 0] / np.maximum(sums[:, 1], 1e-12))


def _sacrebleu(name: str, preds: list[str], refs: list[str]) -> Decomposed:
    import sacrebleu

    metric = sacrebleu.CHRF() if name == "chrf" else sacrebleu.BLEU()
    # The sufficient statistics sacrebleu's own paired bootstrap resamples (private but stable in 2.x).
    stats = np.asarray(metric._extract_corpus_statistics(list(preds), [list(refs)]), dtype=float)

    def value(sums: np.ndarray) -> np.ndarray:
        return np.asarray([metric._compute_score_from_stats(list(row)).score for row in sums])

    return stats, value


def _rouge(kind: str, preds: list[str], refs: list[str]) -> Decomposed:
    from rouge_score import rouge_scorer

    from tuneval.metrics.rouge import split_sentences

    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    if kind == "rougeLsum":
        preds, refs = [split_sentences(p) for p in preds], [split_sentences(r) for r in refs]
    return _mean([scorer.score(r, p)[kind].fmeasure for p, r in zip(preds, refs, strict=True)])


def _squad(name: str, preds: list[str], golds: list[list[str]], v2: bool) -> Decomposed:
    from tuneval.metrics.squad import squad_scores

    return _mean([squad_scores([p], [g], v2)[name] for p, g in zip(preds, golds, strict=True)])


def decompose(problem: str, name: str, table: dict[str, list[Any]], info: dict[str, Any]) -> Decomposed | None:
    """The metric as per-example stats, or None for a metric not written this way."""
    if problem == "classification":
        refs, preds = table["label"], table["prediction"]
        if name == "accuracy":
            return _mean([float(a == b) for a, b in zip(refs, preds, strict=True)])
        if name in ("f1", "precision", "recall"):
            return _macro(refs, preds, len(info["label_names"]), name)
    elif problem == "extractive_qa" and name in ("exact_match", "f1"):
        v2 = bool(info["postprocess"]["version_2_with_negative"])
        return _squad(name, table["prediction_text"], [list(g) for g in table["gold_answers"]], v2)
    elif problem == "seq2seq":
        if name == "perplexity":
            return _perplexity(table["nll"], table["target_tokens"])
        if name.startswith("rouge"):
            return _rouge(name, table["prediction"], table["reference"])
        if name in ("bleu", "chrf"):
            return _sacrebleu(name, table["prediction"], table["reference"])
    return None


def bootstrap_cis(
    problem: str,
    names: list[str],
    table: dict[str, list[Any]],
    info: dict[str, Any],
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{metric: {ci_low, ci_high}}; every metric shares the same resamples (seeded, so reproducible)."""
    n = len(next(iter(table.values()), []))
    if n < 2:
        return {}
    parts = {name: p for name in names if (p := decompose(problem, name, table, info)) is not None}
    sums: dict[str, list[np.ndarray]] = {name: [] for name in parts}
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):  # R x N counts in chunks: memory stays CHUNK x N
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(CHUNK, resamples - start)).astype(float)
        for name, (stats, _) in parts.items():
            sums[name].append(counts @ stats)
    out = {}
    for name, (_, value) in parts.items():
        values = value(np.concatenate(sums[name]))
        values = values[np.isfinite(values)]
        if len(values):
            low, high = np.quantile(values, [0.5 - confidence / 2, 0.5 + confidence / 2])
            out[name] = {"ci_low": float(low), "ci_high": float(high)}
    return out


def point_value(problem: str, name: str, table: dict[str, list[Any]], info: dict[str, Any]) -> float:
    """The metric from its decomposition over all rows (equals the metric module's value; tested)."""
    parts = decompose(problem, name, table, info)
    if parts is None:
        return math.nan
    stats, value = parts
    return float(value(stats.sum(axis=0, keepdims=True))[0])
