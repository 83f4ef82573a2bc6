"""Batched inference under ``inference_mode``: longest inputs first, results in input order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from tuneval.data.batching import iterate, make_collate, sorted_batches

log = logging.getLogger(__name__)


def predict_outputs(
    model: nn.Module,
    ds: Any,
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    pad_id: int,
    padding_side: str,
    device: torch.device,
    batch_size: int,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """Stack ``forward(model, batch)`` for every row of ``ds``, in the dataset's order, on CPU.
    Out of memory halves the batch and starts over (results do not depend on the batch size)."""
    while True:
        try:
            return _predict(model, ds, forward, pad_id, padding_side, device, batch_size, precision, progress)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            log.warning("predict: out of memory; retrying with batch size %d", batch_size)
            if device.type == "cuda":
                torch.cuda.empty_cache()


@torch.inference_mode()
def _predict(
    model: nn.Module,
    ds: Any,
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    pad_id: int,
    padding_side: str,
    device: torch.device,
    batch_size: int,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    from tqdm.auto import tqdm

    model.eval().to(device)
    lengths = [len(x) for x in ds["input_ids"]]
    batches = sorted_batches(lengths, batch_size)
    collate = make_collate(pad_id, padding_side, 8 if device.type == "cuda" else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    out: torch.Tensor | None = None
    for idx, batch in tqdm(
        iterate(ds, batches, collate), total=len(batches), desc="predict", disable=not progress, dynamic_ncols=True
    ):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            values = forward(model, batch).float().cpu()
        if out is None:
            out = torch.empty((len(lengths), *values.shape[1:]), dtype=values.dtype)
        out[torch.tensor(idx)] = values
    assert out is not None, "empty dataset"
    return out
