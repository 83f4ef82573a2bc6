"""Prediction by generation: greedy or beam search, batched with inputs sorted by length.

Encoder-decoders get right-padded sources. Decoder-only models get the prompt alone (the
target is cut off at ``prompt_length``), left-padded so every row's next token follows its
last real one; only the newly generated tokens are decoded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tuneval.data.batching import sorted_batches


def generation_kwargs(settings: dict[str, Any], pad_id: int | None, eos_id: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "do_sample": False,
        "num_beams": settings["num_beams"],
        "max_new_tokens": settings["max_new_tokens"],
        "no_repeat_ngram_size": settings["no_repeat_ngram_size"],
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
    }
    if settings["num_beams"] > 1:
        kw["length_penalty"] = settings["length_penalty"]
    return kw


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([pad_id] * fill + r if side == "left" else r + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
    return torch.tensor(ids), torch.tensor(mask)


@torch.inference_mode()
def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    ds: Any,
    settings: dict[str, Any],
    device: torch.device,
    precision: str = "fp32",
    progress: bool = False,
) -> list[str]:
    """One generated text per row of ``ds`` (tokenized by the seq2seq problem), in row order."""
    from tqdm.auto import tqdm

    model.eval().to(device)
    decoder_only = not model.config.is_encoder_decoder
    inputs = ds["input_ids"]
    if decoder_only:
        inputs = [ids[:n] for ids, n in zip(inputs, ds["prompt_length"], strict=True)]
    gen = model.generation_config
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    kwargs = generation_kwargs(settings, pad_id, gen.eos_token_id)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    texts = [""] * len(inputs)
    batches = sorted_batches([len(x) for x in inputs], settings["batch_size"])
    for idx in tqdm(batches, desc="generate", disable=not progress, dynamic_ncols=True):
        ids, mask = pad_batch([inputs[i] for i in idx], pad_id, "left" if decoder_only else "right")
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        if decoder_only:
            out = out[:, ids.size(1) :]  # the prompt is echoed back first
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True), strict=True):
            texts[i] = text.strip()
    return texts
