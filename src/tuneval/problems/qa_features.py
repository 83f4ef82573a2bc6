"""SQuAD-style data: row checks and sliding-window features with labels and offsets.

Each example becomes one or more windows ``[CLS] question [SEP] context-part [SEP]`` (the
tokenizer's own pair template), ``max_length`` tokens at most, consecutive windows sharing
``doc_stride`` context tokens. A window is labelled with the answer's token span when the whole
answer lies inside it, else with the [CLS] position (index 0 where there is no [CLS]).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from tuneval.errors import DataError

log = logging.getLogger(__name__)

# Why a row is left out of a split; counted and logged, never silent.
EMPTY_QUESTION = "empty_question"
NO_ANSWER = "no_answer"  # v1: answers missing or empty
ANSWER_MISMATCH = "answer_mismatch"  # answer text is not the context at answer_start (train only)


def answer_lists(value: Any, where: str, col: str) -> tuple[list[str], list[int]] | None:
    """(texts, starts) of one row's answers; None when missing. A wrong shape is a DataError."""
    if value is None:
        return None
    if not isinstance(value, dict) or not {"text", "answer_start"} <= set(value):
        raise DataError(
            f'{where}: column \'{col}\' must be {{"text": [...], "answer_start": [...]}} (the SQuAD layout), '
            f"got {str(value)[:80]!r}; fix the data or benchmarks.<name>.columns.answers"
        )
    texts, starts = value["text"] or [], value["answer_start"] or []
    if isinstance(texts, str) or len(texts) != len(starts):
        raise DataError(
            f"{where}: column '{col}' needs lists of equal length in 'text' and 'answer_start' "
            f"(got {texts!r} and {starts!r}); fix that row"
        )
    return [str(t) for t in texts], [int(s) for s in starts]


def row_problem(
    question: Any, context: str, answers: tuple[list[str], list[int]] | None, split: str, v2: bool
) -> str | None:
    """Why this row cannot be used in ``split`` (None when it can)."""
    if not isinstance(question, str) or not question.strip():
        return EMPTY_QUESTION
    if answers is None or (not answers[0] and not v2):
        return NO_ANSWER
    if split == "train" and answers[0]:
        text, start = answers[0][0], answers[1][0]
        if context[start : start + len(text)] != text:
            return ANSWER_MISMATCH
    return None


def scan(splits: dict[str, Any], bench: Any, sources: dict[str, str]) -> dict[str, dict[str, int]]:
    """Check columns, answer shapes and ids of every split; count the rows each split leaves out."""
    cols = bench.columns
    skipped: dict[str, dict[str, int]] = {}
    for split, ds in splits.items():
        for field in ("id", "question", "context", "answers"):
            name = getattr(cols, field)
            if name not in ds.column_names:
                raise DataError(
                    f"{sources[split]}: column '{name}' missing from split '{split}' "
                    f"(columns: {', '.join(ds.column_names)}); fix benchmarks.<name>.columns.{field}"
                )
        ids = [str(i) for i in ds[cols.id]]
        dup = next((i for i, n in Counter(ids).items() if n > 1), None)
        if dup is not None:
            raise DataError(f"{sources[split]}: id {dup!r} occurs more than once in '{split}'; ids must be unique")
        counts: Counter[str] = Counter()
        mismatched = 0
        for n, (q, c, a) in enumerate(zip(ds[cols.question], ds[cols.context], ds[cols.answers], strict=True)):
            if not isinstance(c, str) or not c.strip():
                raise DataError(f"{sources[split]}: row {n + 1} (id {ids[n]}): empty context; fix or drop that row")
            ans = answer_lists(a, f"{sources[split]}: row {n + 1} (id {ids[n]})", cols.answers)
            why = row_problem(q, c, ans, split, bench.version_2_with_negative)
            if why:
                counts[why] += 1
            elif ans and ans[0] and c[ans[1][0] : ans[1][0] + len(ans[0][0])] != ans[0][0]:
                mismatched += 1
        for why, k in counts.items():
            log.warning("%s: %d rows of '%s' skipped (%s)", sources[split], k, split, why)
        if mismatched:
            log.warning(
                "%s: %d rows of '%s' have an answer_start that does not match the answer text; "
                "kept (scoring uses the texts only)",
                sources[split],
                mismatched,
                split,
            )
        if counts and sum(counts.values()) == len(ds):
            raise DataError(
                f"{sources[split]}: every row of '{split}' is unusable ({dict(counts)}); "
                "check benchmarks.<name>.columns and the data"
            )
        skipped[split] = dict(counts)
    return skipped


def question_budget(tokenizer: Any, bench: Any) -> int:
    """Most question tokens a window can hold while keeping more than doc_stride context tokens."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    budget = bench.max_length - bench.doc_stride - specials - 1
    if budget < 1:
        raise DataError(
            f"benchmarks.<name>: max_length {bench.max_length} - doc_stride {bench.doc_stride} leaves no room for "
            f"a question ({specials} special tokens); lower doc_stride or raise max_length"
        )
    return budget


def clip_questions(questions: list[str], tokenizer: Any, budget: int) -> tuple[list[str], int]:
    """Strip leading blanks (they waste tokens) and cut questions longer than ``budget`` tokens."""
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out, clipped = [], 0
    for q, offs in zip(questions, enc["offset_mapping"], strict=True):
        if len(offs) > budget:
            q = q[: offs[budget - 1][1]]
            clipped += 1
        out.append(q)
    return out, clipped


def windows(
    questions: list[str],
    contexts: list[str],
    answers: list[tuple[list[str], list[int]]],
    tokenizer: Any,
    max_length: int,
    doc_stride: int,
    keep_offsets: bool,
) -> dict[str, list[Any]]:
    """Tokenize (question, context) pairs into overlapping windows with start/end labels.

    Returns per window: token ids (and mask/type ids), ``start_positions``/``end_positions``,
    ``example_index`` (into the inputs) and, when ``keep_offsets``, ``offset_mapping`` with None
    for every token outside the context, and ``cls_index``.
    """
    enc = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    out: dict[str, list[Any]] = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out.update(start_positions=[], end_positions=[], example_index=[], cls_index=[])
    if keep_offsets:
        out["offset_mapping"] = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex = enc["overflow_to_sample_mapping"][i]
        seq = enc.sequence_ids(i)
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        ctx_start = seq.index(1)
        ctx_end = len(seq) - 1 - seq[::-1].index(1)
        start = end = cls
        texts, starts = answers[ex]
        if texts:
            a_start = starts[0]
            a_end = a_start + len(texts[0])
            # Label only when the whole answer lies in this window's context.
            if offsets[ctx_start][0] <= a_start and offsets[ctx_end][1] >= a_end:
                start = ctx_start
                while start <= ctx_end and offsets[start][1] <= a_start:
                    start += 1
                end = ctx_end
                while end >= ctx_start and offsets[end][0] >= a_end:
                    end -= 1
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out["example_index"].append(ex)
        out["cls_index"].append(cls)
        if keep_offsets:
            out["offset_mapping"].append([list(o) if s == 1 else None for o, s in zip(offsets, seq, strict=True)])
    return out
