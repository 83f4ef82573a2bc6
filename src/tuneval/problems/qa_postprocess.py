"""From per-window start/end logits to one answer per example (pure functions, no model).

After transformers' examples/pytorch/question-answering/utils_qa.py
``postprocess_qa_predictions``: for every window of an example take the ``n_best`` start and
end positions, keep pairs that lie inside the context (offset not None), end >= start and
span <= ``max_answer_length`` tokens; the best-scoring pair (start + end logit) over all windows
wins and is mapped back to the context's characters. SQuAD v2: the null score is the smallest
[CLS]-position score over the windows; answer "" when null - best span > the threshold.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Offsets = Sequence[Sequence[int] | None]


@dataclass(frozen=True)
class Answer:
    id: str
    text: str
    score: float  # start + end logit of the chosen span (the null score when answering "")
    probability: float  # softmax of the chosen candidate's score over the n-best list
    start_char: int  # -1 for ""
    null_score: float | None = None  # v2 only
    no_answer: bool = False


def postprocess(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    feature_example_ids: Sequence[str],
    offsets: Sequence[Offsets],
    contexts: dict[str, str],
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
    cls_index: Sequence[int] | None = None,
) -> list[Answer]:
    """One ``Answer`` per example of ``contexts`` (in its order).

    ``start_logits``/``end_logits``: [features, width] (a window may be shorter than ``width``:
    positions past its offsets are ignored). ``offsets[f][t]``: the (start, end) characters of
    token ``t`` in the context, None outside the context. ``cls_index[f]``: where the window's
    "no answer" position is (default 0).
    """
    by_example: dict[str, list[int]] = defaultdict(list)
    for f, ex in enumerate(feature_example_ids):
        by_example[ex].append(f)
    answers = []
    for ex, context in contexts.items():
        answers.append(
            _best_answer(
                ex,
                context,
                by_example.get(ex, []),
                start_logits,
                end_logits,
                offsets,
                n_best,
                max_answer_length,
                version_2_with_negative,
                null_score_diff_threshold,
                cls_index,
            )
        )
    return answers


def _best_answer(
    ex: str,
    context: str,
    features: list[int],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: Sequence[Offsets],
    n_best: int,
    max_answer_length: int,
    v2: bool,
    threshold: float,
    cls_index: Sequence[int] | None,
) -> Answer:
    candidates: list[tuple[float, int, int]] = []  # (score, start char, end char)
    null_score: float | None = None
    for f in features:
        off = offsets[f]
        width = len(off)
        starts, ends = start_logits[f][:width], end_logits[f][:width]
        cls = cls_index[f] if cls_index is not None else 0
        feature_null = float(starts[cls] + ends[cls])
        if null_score is None or feature_null < null_score:
            null_score = feature_null
        for s in np.argsort(starts)[::-1][:n_best]:
            if off[s] is None:
                continue
            for e in np.argsort(ends)[::-1][:n_best]:
                if off[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                candidates.append((float(starts[s] + ends[e]), int(off[s][0]), int(off[e][1])))
    candidates.sort(key=lambda c: -c[0])
    candidates = candidates[:n_best]
    pool = [c[0] for c in candidates] + ([null_score] if v2 and null_score is not None else [])
    probs = _softmax(pool)
    if candidates:
        score, s_char, e_char = candidates[0]
        best = Answer(ex, context[s_char:e_char], score, probs[0], s_char)
    else:  # no window had a valid span (e.g. every candidate too long)
        best = Answer(ex, "", float("-inf"), 0.0, -1)
    if not v2:
        return best
    assert null_score is not None or not features
    null = null_score if null_score is not None else 0.0
    if not candidates or null - best.score > threshold:
        return Answer(ex, "", null, probs[-1] if pool else 1.0, -1, null, True)
    return Answer(ex, best.text, best.score, best.probability, best.start_char, null, False)


def _softmax(scores: list[float]) -> list[float]:
    if not scores:
        return []
    x = np.asarray(scores, dtype=np.float64)
    e = np.exp(x - x.max())
    return (e / e.sum()).tolist()


def as_columns(answers: list[Answer]) -> dict[str, list[Any]]:
    return {
        "id": [a.id for a in answers],
        "prediction_text": [a.text for a in answers],
        "score": [a.score for a in answers],
        "probability": [a.probability for a in answers],
        "start_char": [a.start_char for a in answers],
        "null_score": [a.null_score for a in answers],
        "no_answer": [a.no_answer for a in answers],
    }
