"""Post-processing on synthetic logits: windows, span limits, context-only spans, SQuAD v2 nulls."""

from __future__ import annotations

import numpy as np
import pytest

from tuneval.problems.qa_postprocess import postprocess

CONTEXT = "Chopin was born in Zelazowa Wola near Warsaw in 1810"
WORDS = CONTEXT.split()


def word_offsets(first: int, last: int) -> list[tuple[int, int]]:
    """Character spans of context words first..last (inclusive)."""
    spans, pos = [], 0
    for w in WORDS:
        start = CONTEXT.index(w, pos)
        spans.append((start, start + len(w)))
        pos = start + len(w)
    return spans[first : last + 1]


def window(first: int, last: int, question_tokens: int = 2):
    """[CLS] q q [SEP] context words first..last [SEP]: offsets None outside the context."""
    return [None] * (1 + question_tokens + 1) + word_offsets(first, last) + [None]


def logits_for(offsets, start_at: dict[int, float], end_at: dict[int, float], width: int = 16):
    s, e = np.full(width, -10.0), np.full(width, -10.0)
    s[len(offsets) :] = e[len(offsets) :] = 50.0  # past the window's end: must be ignored
    for i, v in start_at.items():
        s[i] = v
    for i, v in end_at.items():
        e[i] = v
    return s, e


def run(windows, starts, ends, **kw):
    return postprocess(np.stack(starts), np.stack(ends), ["ex"] * len(windows), windows, {"ex": CONTEXT}, **kw)[0]


def test_answer_cut_by_a_window_boundary_is_found_in_the_next_window() -> None:
    # Window 0 holds words 0..4 ("... Zelazowa" ends it), window 1 holds words 3..9.
    # The answer "Zelazowa Wola" (words 4-5) is whole only in window 1 (tokens 5-6 there).
    w0, w1 = window(0, 4), window(3, 9)
    s0, e0 = logits_for(w0, {8: 3.0}, {8: 2.0})  # "Zelazowa" alone: 5.0
    s1, e1 = logits_for(w1, {5: 4.0}, {6: 4.0})  # "Zelazowa Wola": 8.0
    answer = run([w0, w1], [s0, s1], [e0, e1])
    assert answer.text == "Zelazowa Wola" and answer.score == pytest.approx(8.0)
    assert CONTEXT[answer.start_char :].startswith("Zelazowa Wola")
    # The better window wins whichever it is.
    s0[8] = 9.0
    assert run([w0, w1], [s0, s1], [e0, e1]).text == "Zelazowa"


def test_max_answer_length_rules_out_long_spans() -> None:
    w = window(0, 9)
    # Token 4 + k is context word k. Best pair: words 4..9 (6 tokens, score 12).
    s, e = logits_for(w, {8: 6.0}, {13: 6.0, 8: 2.0})
    assert run([w], [s], [e]).text == "Zelazowa Wola near Warsaw in 1810"
    short = run([w], [s], [e], max_answer_length=2)
    assert short.text == "Zelazowa" and short.score == pytest.approx(8.0)


def test_spans_outside_the_context_and_reversed_spans_are_skipped() -> None:
    w = window(0, 9)
    # Highest start on a question token (1) and on [CLS] (0); highest end before the start.
    s, e = logits_for(w, {0: 20.0, 1: 10.0, 10: 3.0}, {0: 20.0, 2: 10.0, 9: 9.0, 11: 1.0})
    answer = run([w], [s], [e])
    assert answer.text == "near Warsaw" and answer.score == pytest.approx(4.0)


def test_n_best_limits_the_candidates_per_window() -> None:
    w = window(0, 9)
    # The best start (Warsaw) has only ends before it; the valid pair (near, near) needs start rank 2.
    s, e = logits_for(w, {11: 9.0, 10: 8.0}, {10: 9.0})
    assert run([w], [s], [e]).text == "near"
    assert run([w], [s], [e], n_best=1).text == ""  # nothing valid among one candidate each


def test_version_2_null_answer_against_threshold() -> None:
    w0, w1 = window(0, 5), window(4, 9)
    s0, e0 = logits_for(w0, {0: 3.0, 4: 2.0}, {0: 3.0, 4: 2.0})  # null 6, span "Chopin" 4
    s1, e1 = logits_for(w1, {0: 2.5, 6: 2.0}, {0: 2.5, 6: 2.0})  # null 5 (the minimum), "near" 4
    kw = {"version_2_with_negative": True}
    answer = run([w0, w1], [s0, s1], [e0, e1], **kw)
    assert answer.no_answer and answer.text == "" and answer.null_score == pytest.approx(5.0)
    # null - best = 1.0: a threshold of 1.0 or more keeps the span.
    kept = run([w0, w1], [s0, s1], [e0, e1], null_score_diff_threshold=1.0, **kw)
    assert not kept.no_answer and kept.text in ("Chopin", "near") and kept.score == pytest.approx(4.0)


def test_examples_keep_their_order_and_each_gets_an_answer() -> None:
    w = window(0, 9)
    s, e = logits_for(w, {8: 5.0}, {9: 5.0})
    out = postprocess(np.stack([s, s]), np.stack([e, e]), ["b", "a"], [w, w], {"a": CONTEXT, "b": CONTEXT})
    assert [a.id for a in out] == ["a", "b"] and {a.text for a in out} == {"Zelazowa Wola"}
    assert 0 < out[0].probability <= 1
