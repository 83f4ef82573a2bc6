"""Seq2seq formatting as pure functions: reading (dotted) columns, prompts, and labels.

Labels use -100 (``batching.PAD_LABEL``) for every position the loss must ignore. Collate pads
``labels`` with -100 too, so padding never counts either.
"""

from __future__ import annotations

from typing import Any

from tuneval.data.batching import PAD_LABEL

CAUSAL_SEPARATOR = "\n"  # ends a decoder-only prompt, so the model can tell where the target starts


def column_value(row: dict[str, Any], name: str) -> Any:
    """``row[name]``, where a dotted name walks nested dicts (``translation.en``)."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def has_column(column_names: list[str], first_row: dict[str, Any] | None, name: str) -> bool:
    if "." not in name:
        return name in column_names
    if first_row is None:
        return name.split(".")[0] in column_names
    try:
        column_value(first_row, name)
    except KeyError:
        return False
    return True


def source_text(prefix: str, source: str) -> str:
    return f"{prefix}{source}"


def causal_prompt(prefix: str, source: str) -> str:
    return f"{prefix}{source}{CAUSAL_SEPARATOR}"


def encdec_labels(target_ids: list[int], decoder_start_id: int | None) -> list[int]:
    """Target token ids as labels for an encoder-decoder.

    The model builds its decoder inputs by shifting labels right behind ``decoder_start_id``;
    a tokenizer that itself starts the target with that token ([CLS] for BERT2BERT) would make
    the decoder learn to repeat it, so a leading copy is dropped.
    """
    if target_ids and decoder_start_id is not None and target_ids[0] == decoder_start_id:
        return list(target_ids[1:])
    return list(target_ids)


def causal_example(prompt_ids: list[int], target_ids: list[int], eos_id: int, max_target_tokens: int) -> dict[str, Any]:
    """Decoder-only training row: prompt + target + eos; the loss sees only target and eos.

    ``max_target_tokens`` counts the eos, which is always kept so the model learns to stop.
    """
    if max_target_tokens < 1:
        raise ValueError("max_target_tokens must be at least 1 (room for eos)")
    target = list(target_ids[: max_target_tokens - 1]) + [eos_id]
    input_ids = list(prompt_ids) + target
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [PAD_LABEL] * len(prompt_ids) + target,
        "prompt_length": len(prompt_ids),
    }


def target_token_count(labels: list[int]) -> int:
    """Tokens that perplexity averages over: every label the loss sees."""
    return sum(1 for t in labels if t != PAD_LABEL)
