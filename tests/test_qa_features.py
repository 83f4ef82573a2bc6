"""Windows and labels on crafted long contexts, and bad QA input (counted skips or one clear error)."""

from __future__ import annotations

import pytest
from datasets import Dataset

from tuneval.config.benchmarks import ExtractiveQABenchmark
from tuneval.errors import DataError
from tuneval.models import loading
from tuneval.problems import extractive_qa, qa_features

WORDS = "the movie film great good bad awful boring brilliant fun dull plot acting actor story".split()


def bench(**kw) -> ExtractiveQABenchmark:
    return ExtractiveQABenchmark(problem="extractive_qa", data={"files": {"train": "t", "test": "t"}}, **kw)


@pytest.fixture(scope="module")
def tok(model_dir):
    return loading.load_tokenizer(str(model_dir / "bert"))


def long_context(n: int = 30) -> str:
    """One token per word (the tiny vocabulary holds each whole): word k is context token k."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def char_span(context: str, first: int, last: int) -> tuple[int, str]:
    """Start char and text of words first..last of a white-space separated context."""
    words = context.split()
    start = len(" ".join(words[:first])) + (1 if first else 0)
    text = " ".join(words[first : last + 1])
    assert context[start : start + len(text)] == text
    return start, text


def windows_for(tok, context: str, first: int, last: int, max_length: int = 16, stride: int = 4):
    start, text = char_span(context, first, last)
    out = qa_features.windows(["best movie"], [context], [([text], [start])], tok, max_length, stride, True)
    return out, start, text


def context_chars(out: dict, w: int) -> tuple[int, int]:
    spans = [o for o in out["offset_mapping"][w] if o is not None]
    return spans[0][0], spans[-1][1]


def test_windows_cover_a_long_context_with_overlap(tok) -> None:
    context = long_context()
    out, _, _ = windows_for(tok, context, 12, 13)
    n = len(out["input_ids"])
    assert n >= 3 and all(len(ids) <= 16 for ids in out["input_ids"])
    for w in range(n):
        ids = out["input_ids"][w]
        assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2  # [CLS] q [SEP] c [SEP]
        assert out["offset_mapping"][w][0] is None  # question side and specials are nulled
    # Consecutive windows share doc_stride (4) context tokens, and together reach the context's end.
    for w in range(n - 1):
        a = [tuple(o) for o in out["offset_mapping"][w] if o]
        b = [tuple(o) for o in out["offset_mapping"][w + 1] if o]
        assert a[-4:] == b[:4]
    assert context_chars(out, n - 1)[1] == len(context)


@pytest.mark.parametrize("first,last", [(12, 13), (10, 11), (0, 0), (29, 29)])
def test_label_is_the_answer_span_where_whole_else_cls(tok, first: int, last: int) -> None:
    context = long_context()
    out, start, text = windows_for(tok, context, first, last)
    labelled = []
    for w, offsets in enumerate(out["offset_mapping"]):
        lo, hi = context_chars(out, w)
        s, e = out["start_positions"][w], out["end_positions"][w]
        if lo <= start and start + len(text) <= hi:
            labelled.append(w)
            assert context[offsets[s][0] : offsets[e][1]] == text
        else:
            assert (s, e) == (0, 0)  # [CLS]
    assert labelled  # with overlap 4, these short answers are whole in some window


def test_answer_cut_by_the_first_window_boundary(tok) -> None:
    context = long_context()
    # 11 context tokens per window (16 - 2 question - 3 special): window 0 holds words 0..10.
    out, start, text = windows_for(tok, context, 10, 11)
    assert len(tok(context, add_special_tokens=False)["input_ids"]) == 30
    # Window 0 ends inside the answer: [CLS]; window 1 (words 7..17) holds it whole.
    assert context_chars(out, 0)[1] < start + len(text)
    assert (out["start_positions"][0], out["end_positions"][0]) == (0, 0)
    s, e = out["start_positions"][1], out["end_positions"][1]
    assert s > 0 and context[out["offset_mapping"][1][s][0] : out["offset_mapping"][1][e][1]] == text


def test_answer_longer_than_any_window_is_cls_everywhere(tok) -> None:
    out, _, _ = windows_for(tok, long_context(), 3, 20)
    assert set(out["start_positions"]) == {0} and set(out["end_positions"]) == {0}


def qa_ds(rows: list[dict]) -> Dataset:
    return Dataset.from_list(rows)


def row(i: int, question: str = "best movie", answers=None, context: str = "great movie good plot") -> dict:
    return {
        "id": str(i),
        "question": question,
        "context": context,
        "answers": {"text": ["movie"], "answer_start": [6]} if answers is None else answers,
    }


def test_bad_rows_are_counted_skips_in_train() -> None:
    rows = [
        row(0),
        row(1, question="   "),  # empty question
        row(2, answers={"text": ["movie"], "answer_start": [0]}),  # text not at answer_start
        row(3, answers={"text": [], "answer_start": []}),  # no answer in v1
    ]
    splits = {"train": qa_ds(rows), "test": qa_ds(rows)}
    info = extractive_qa.check_data(splits, bench(), {"train": "train.jsonl", "test": "test.jsonl"})
    assert info["skipped"]["train"] == {"empty_question": 1, "answer_mismatch": 1, "no_answer": 1}
    # In test the gold texts are all that matter: a bad answer_start is kept (and logged).
    assert info["skipped"]["test"] == {"empty_question": 1, "no_answer": 1}


def test_prepare_drops_skipped_rows_and_keeps_what_scoring_needs(tok) -> None:
    rows = [row(0), row(1, question=""), row(2, answers={"text": ["movie"], "answer_start": [0]})]
    b = bench(max_length=32, doc_stride=8)
    info = extractive_qa.check_data({"train": qa_ds(rows)}, b, {"train": "t"})
    train = extractive_qa.prepare_split(qa_ds(rows), tok, b, info, "train")
    assert train["example_id"] == ["0"] and "offset_mapping" not in train.column_names
    test = extractive_qa.prepare_split(qa_ds(rows), tok, b, info, "test")
    assert test["example_id"] == ["0", "2"]
    assert {"offset_mapping", "context", "answers", "question", "cls_index"} <= set(test.column_names)
    assert test["answers"][0] == ["movie"]


@pytest.mark.parametrize(
    "rows,expected",
    [
        ([{"id": "0", "question": "q", "context": "c"}], ["column 'answers' missing", "columns.answers"]),
        ([row(0, answers={"text": "movie", "answer_start": 6})], ["row 1 (id 0)", "lists of equal length"]),
        ([row(0, answers=["movie"])], ["row 1 (id 0)", "SQuAD layout"]),
        ([row(0), row(0)], ["id '0' occurs more than once"]),
        ([row(0, question=""), row(1, question=" ")], ["every row of 'train' is unusable"]),
        ([row(0, context="")], ["row 1 (id 0): empty context"]),
    ],
)
def test_bad_data_is_one_clear_error(rows: list[dict], expected: list[str]) -> None:
    with pytest.raises(DataError) as e:
        extractive_qa.check_data({"train": qa_ds(rows)}, bench(), {"train": "data/train.jsonl"})
    msg = str(e.value)
    assert msg.startswith("data/train.jsonl") and "\n" not in msg
    for part in expected:
        assert part in msg


def test_stride_must_leave_room_and_long_questions_are_cut(tok) -> None:
    with pytest.raises(ValueError, match="doc_stride .16. must be smaller than max_length .16."):
        bench(max_length=16, doc_stride=16)
    with pytest.raises(DataError, match="leaves no room for a question"):
        qa_features.question_budget(tok, bench(max_length=16, doc_stride=12))
    budget = qa_features.question_budget(tok, bench(max_length=16, doc_stride=4))
    assert budget == 16 - 4 - 3 - 1
    long_q = " ".join(WORDS)  # 15 tokens
    clipped, n = qa_features.clip_questions([long_q, "  best movie"], tok, budget)
    assert n == 1 and clipped[1] == "best movie"
    assert len(tok(clipped[0], add_special_tokens=False)["input_ids"]) == budget
    out = qa_features.windows(clipped, ["great movie"] * 2, [(["movie"], [6])] * 2, tok, 16, 4, False)
    assert len(out["input_ids"]) == 2 and out["start_positions"][0] > 0
