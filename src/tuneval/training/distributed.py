"""Data parallel (``train.devices`` > 1): the ``Dist`` view of its process group that the loop uses.

Same result as one process with the same global batch: every rank draws the same global batch
order (same seed), takes its contiguous slice of each global batch (``shard``), and scales its loss
by ``world_size * its share of the batch's loss units`` (rows, or label tokens for token-level
losses), so DDP's gradient mean equals the gradient of the global batch's mean loss, also when
shards hold unequal row or token counts. ``launch`` starts the processes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from tuneval.data.batching import PAD_LABEL, iterate
from tuneval.errors import TunevalError
from tuneval.training.device import resolve_device

log = logging.getLogger(__name__)


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch; sizes differ by at most one, the first
    ranks take the extra rows. A batch shorter than ``world_size`` leaves the last ranks empty."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (rank < extra)]


def loss_units(batch: dict[str, torch.Tensor]) -> int:
    """What the problem's loss averages over, counted on the host: label tokens when labels are
    per token (seq2seq: Hugging Face's mean over labels != -100; decoder-only prompts start every
    row with -100, so the causal shift drops no counted token), else rows."""
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        return int((labels != PAD_LABEL).sum())
    return len(next(iter(batch.values())))


@dataclass(frozen=True)
class Dist:
    """One process's place in the group. ``Dist()`` is the single-process case: every method is a no-op."""

    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, batch: list[int]) -> tuple[list[int], bool]:
        """This rank's rows of a global batch, and whether they count. An empty slice becomes the
        batch's first row with weight 0: the rank must still join the gradient all-reduce."""
        if not self.active:
            return batch, True
        mine = shard(batch, self.rank, self.world_size)
        return (mine, True) if mine else (batch[:1], False)

    def iterate(
        self, ds: Any, batches: list[list[int]], collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor], int]]:
        """Per global batch: its indices, this rank's collated shard, and the shard's loss units."""
        shards = [self.shard(b) for b in batches]
        local = iterate(ds, [mine for mine, _ in shards], collate)
        for idx, (_, counts), (_, batch) in zip(batches, shards, local, strict=True):
            yield idx, batch, (loss_units(batch) if counts and self.active else 0)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Unused parameters are normal here (BERT's pooler, frozen layers are excluded anyway).
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    def loss_share(self, units: int, device: torch.device) -> torch.Tensor | float:
        """This rank's share of the global batch's loss units (1 alone). Stays on the device: no host sync."""
        if not self.active:
            return 1.0
        mine = torch.tensor(float(units), device=device, dtype=torch.float64)
        total = mine.clone()
        torch.distributed.all_reduce(total)
        return (mine / total).float()

    def scale_for_backward(self, loss: torch.Tensor, share: torch.Tensor | float) -> torch.Tensor:
        """DDP averages gradients over ranks; ``world_size * share`` turns that mean into the share-weighted sum."""
        return loss * (share * self.world_size) if self.active else loss

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            value = value.clone()
            torch.distributed.all_reduce(value)
        return value

    def to_main(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks on rank 0 and zero elsewhere: a running sum that rank 0 checkpoints."""
        if not self.active:
            return value
        total = self.sum(value)
        return total if self.is_main else torch.zeros_like(total)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce on accumulation micro-batches that are not the last."""
        if self.active and not sync:
            return model.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()


SINGLE = Dist()


@contextlib.contextmanager
def process_group(requested_device: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK): nccl on CUDA, gloo on CPU."""
    import torch.distributed as td

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # Rank 0 alone validates and writes checkpoints while the others wait in their next collective:
    # a long validation must not trip the default timeout (10 min on nccl).
    backend = "nccl" if device.type == "cuda" else "gloo"
    td.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(hours=2))
    try:
        yield Dist(world_size=world, rank=rank), device
    finally:
        td.destroy_process_group()


def check_devices(devices: int, requested_device: str) -> None:
    """On CUDA each process needs its own card; on CPU any number of gloo processes works."""
    if resolve_device(requested_device).type == "cuda" and torch.cuda.device_count() < devices:
        raise TunevalError(
            f"train.devices is {devices} but {torch.cuda.device_count()} CUDA device(s) are visible; "
            "lower train.devices or make more cards visible (CUDA_VISIBLE_DEVICES)"
        )
