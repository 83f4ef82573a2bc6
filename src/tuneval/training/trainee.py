"""What the training loop trains: one model (``Solo``), or k seeds stacked (``multi_seed.Stacked``).

The loop (``training.loop.run``) is written once against this small interface: per step it asks
the trainee for the step's batch, for one loss per seed, and for the clipped optimizer step; per
epoch it evaluates each seed's model. A seed's data order, curves, validation and best epoch are
kept by the loop, per seed, whatever the trainee.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn as nn

from tuneval.config.train import TrainSettings
from tuneval.training.checkpoints import cpu_copy, load_trained_state, trained_state
from tuneval.training.distributed import Dist
from tuneval.training.optim import apply_trainable, build_optimizer, clip_and_step

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
# Per step: each seed's row indices, the batch on the device, and its loss units (data parallel).
Step = tuple[list[list[int]], dict[str, torch.Tensor], int]


class Trainee(Protocol):
    models: list[nn.Module]  # each seed's model, as evaluation and saving see it
    trainable_parameters: list[int]

    def optimizer(self, s: TrainSettings, device: torch.device) -> torch.optim.Optimizer: ...

    def start(self, dist: Dist, device: torch.device, s: TrainSettings) -> None:
        """After a checkpoint is restored, before the first step (data-parallel wrapping, compile)."""

    def train(self) -> None: ...

    def steps(
        self, ds: Any, plans: list[list[list[int]]], collate: Collate, device: torch.device, dist: Dist
    ) -> Iterator[Step]: ...

    def losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per seed: a (k,) tensor."""

    def no_sync(self, dist: Dist, sync: bool) -> contextlib.AbstractContextManager[Any]: ...

    def clip_and_step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float | None
    ) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...

    def snapshot(self, j: int) -> dict[str, torch.Tensor]:
        """A CPU copy of seed ``j``'s weights, kept for its best epoch (``checkpoint: best``)."""

    def restore(self, j: int, state: dict[str, torch.Tensor]) -> None:
        """Put a ``snapshot`` back into seed ``j``'s model (after ``finish``)."""

    def finish(self) -> None:
        """After the last step, before the best epoch's weights are put back."""


class Solo:
    """One model, trained with the problem's own loss; under data parallel, its DDP wrapper."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, s: TrainSettings, device: torch.device):
        model.to(device)
        self.model, self.loss_fn = model, loss_fn
        self.models = [model]
        self.trainable_parameters = [apply_trainable(model, s.trainable)]
        self.wrapped: nn.Module = model
        self.forward: nn.Module = model

    def optimizer(self, s: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
        return build_optimizer(self.model, s, device)

    def start(self, dist: Dist, device: torch.device, s: TrainSettings) -> None:
        self.wrapped = dist.wrap(self.model, device)
        # Only the training forward goes through the compiled wrapper; it shares the parameters, so
        # the optimizer, checkpoints, evaluation and the saved model all keep using the model itself.
        self.forward = torch.compile(self.wrapped, dynamic=True) if s.compile else self.wrapped

    def train(self) -> None:
        self.wrapped.train()

    def steps(
        self, ds: Any, plans: list[list[list[int]]], collate: Collate, device: torch.device, dist: Dist
    ) -> Iterator[Step]:
        for idx, batch, units in dist.iterate(ds, plans[0], collate):
            yield [idx], {k: v.to(device, non_blocking=True) for k, v in batch.items()}, units

    def losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.forward, batch).reshape(1)

    def no_sync(self, dist: Dist, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return dist.no_sync(self.wrapped, sync)

    def clip_and_step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float | None
    ) -> None:
        clip_and_step(optimizer, scaler, self.model, max_norm)

    def state_dict(self) -> dict[str, Any]:
        return trained_state(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        return load_trained_state(self.model, state)

    def snapshot(self, j: int) -> dict[str, torch.Tensor]:
        return cpu_copy(trained_state(self.model))  # under LoRA: the adapters and head, not the base

    def restore(self, j: int, state: dict[str, torch.Tensor]) -> None:
        load_trained_state(self.model, state)

    def finish(self) -> None:
        pass
