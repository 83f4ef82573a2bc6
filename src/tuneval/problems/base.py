"""What every problem kind provides. Stages call only these; nothing else is problem-specific.

A problem is a module with these names (structural typing, no registration machinery).
``info`` is the problem's own summary of the data made by ``check_data`` (for classification:
the label names); it is stored in the prepare artifact and handed to every later hook.

One optional hook: ``intrinsic(model, tokenizer, ds, info, rt) -> dict[str, float]`` scores the
pre-trained model itself (built by ``build_model``, before any training) on the test split;
when a problem has it, the ``intrinsic`` stage runs (seq2seq: pre-trained perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Runtime:
    """How to run a model for evaluation or prediction (speed knobs, not results)."""

    device: torch.device
    precision: str
    batch_size: int
    progress: bool = False


class Problem(Protocol):
    NAME: str
    METRICS: tuple[str, ...]
    TRAIN_COLUMNS: tuple[str, ...]  # the columns collate turns into tensors for training

    def check_data(self, splits: dict[str, Any], bench: Any, sources: dict[str, str]) -> dict[str, Any]: ...

    def prepare_split(self, ds: Any, tokenizer: Any, bench: Any, info: dict[str, Any], split: str) -> Any: ...

    def build_model(self, run: Any, tokenizer: Any, info: dict[str, Any]) -> nn.Module: ...

    def loss_fn(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(
        self, model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime
    ) -> dict[str, float]: ...

    def predict(
        self, model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime
    ) -> dict[str, list[Any]]: ...

    def save_model(self, model: nn.Module, tokenizer: Any, folder: Path, info: dict[str, Any]) -> None: ...

    def load_model(self, folder: Path) -> tuple[nn.Module, Any, dict[str, Any]]: ...

    def score(
        self, table: dict[str, list[Any]], names: list[str], info: dict[str, Any]
    ) -> tuple[dict[str, float], dict[str, Any]]: ...
