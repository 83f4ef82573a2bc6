"""Batches: length-grouped sampling and dynamic padding (left or right, to a multiple of N)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

PAD_LABEL = -100  # ignored by cross-entropy


def length_grouped_batches(
    lengths: list[int],
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool = True,
    group: bool = True,
    mega: int = 50,
) -> list[list[int]]:
    """Index batches. Grouping sorts each run of ``mega`` batches by length so padding stays low,
    then shuffles the batch order, as Trainer's group_by_length does; all driven by ``generator``."""
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    if group:
        chunk = batch_size * mega
        order = [i for s in range(0, n, chunk) for i in sorted(order[s : s + chunk], key=lambda j: -lengths[j])]
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if shuffle and group and len(batches) > 1:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Inference batches, longest first, so padding is minimal and an OOM shows up at once."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def make_collate(
    pad_id: int,
    padding_side: str = "right",
    multiple_of: int | None = None,
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pad token-id style fields per batch; copy scalar fields (labels) into a tensor."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if key == "example_id":
                continue
            if isinstance(values[0], list):
                # Each field to its own longest row: seq2seq labels (targets) may outrun input_ids.
                width = max(len(v) for v in values)
                if multiple_of:
                    width = -(-width // multiple_of) * multiple_of
                fill = pad_id if key == "input_ids" else (PAD_LABEL if key == "labels" else 0)
                out[key] = torch.tensor([_pad(v, width, fill, padding_side) for v in values])
            else:
                out[key] = torch.tensor(values)
        return out

    return collate


def _pad(seq: list[int], width: int, fill: int, side: str) -> list[int]:
    pad = [fill] * (width - len(seq))
    return pad + seq if side == "left" else seq + pad


def iterate(
    ds: Any,
    batches: list[list[int]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    for idx in batches:
        rows = ds[idx]  # columnar dict for this batch
        yield idx, collate([{k: rows[k][i] for k in rows} for i in range(len(idx))])
