"""Training checkpoints: everything needed to continue a killed run to the identical result.

A checkpoint holds the model, optimizer, scheduler and grad-scaler states, the RNG states of
python, numpy, torch (CPU and CUDA) and of each seed's data-order generator, the epoch's batch
orders and the position in them, and the curves so far. Files are written to a temporary name and renamed, so a
kill during a save leaves the previous checkpoint intact. They live in the finetune stage's
work folder (``<cache>/finetune/<key>.work``), which is removed once the stage's artifact is
committed. Loaded with ``weights_only=False``: these files are the cache's own, never user input.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

EPOCH_START, STEP = 1, 0  # the last digit of a file name: an epoch-start file outranks a step file


@dataclass
class LoopState:
    """Where the loop is, and what it has gathered per seed (one seed, or the k seeds of a
    multi-seed pass): lists indexed by seed hold each seed's own batch order, curves and best."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch_index: int = 0  # batches of this epoch already consumed
    step: int = 0  # optimizer steps done
    batches: list[list[list[int]]] = field(default_factory=list)  # per seed: this epoch's batch order
    history: list[list[dict[str, float]]] = field(default_factory=list)
    epochs: list[list[dict[str, float]]] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)
    running_sum: list[float] = field(default_factory=list)
    running_n: int = 0
    best_score: list[float | None] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)
    best_state: list[dict[str, torch.Tensor] | None] = field(default_factory=list)

    @classmethod
    def fresh(cls, k: int) -> LoopState:
        return cls(
            history=[[] for _ in range(k)],
            epochs=[[] for _ in range(k)],
            samples=[0] * k,
            real_tokens=[0] * k,
            running_sum=[0.0] * k,
            best_score=[None] * k,
            best_epoch=[0] * k,
            best_state=[None] * k,
        )


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training can change: every tensor of the state dict but the frozen parameters (under LoRA
    or ``trainable: head``, nearly all of them), which a resumed run rebuilds from the pre-trained
    model. Tied weights count under each of their names."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {n: v for n, v in model.state_dict().items() if n not in frozen}


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``trained_state`` back; anything else missing or left over is an error, not a silent skip."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    left = [n for n in missing if n not in frozen]
    if unexpected or left:
        raise RuntimeError(f"checkpoint does not fit the model: unexpected {unexpected[:3]}, missing {left[:3]}")


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: v.detach().to("cpu", copy=True) for n, v in state.items()}


def _files(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob("ckpt-*.pt")) if work_dir.exists() else []


def save(
    work_dir: Path,
    loop: LoopState,
    model: Stateful,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    gens: list[torch.Generator],
    running: torch.Tensor,
    keep: int,
    epoch_start: bool = False,
) -> Path:
    """``model``: the trained module, or a multi-seed pass's stacked weights (anything with a state dict)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    loop.running_sum = [float(x) for x in running.tolist()]
    payload = {
        "loop": {f.name: getattr(loop, f.name) for f in fields(loop) if f.name != "best_state"},
        "best_state": loop.best_state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": [g.get_state() for g in gens],
        },
    }
    path = work_dir / f"ckpt-{loop.step:09d}-{EPOCH_START if epoch_start else STEP}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    _prune(work_dir, keep)
    return path


def _prune(work_dir: Path, keep: int) -> None:
    files = _files(work_dir)
    newest_epoch_start = next((p for p in reversed(files) if p.stem.endswith(f"-{EPOCH_START}")), None)
    for p in files[:-keep]:
        if p != newest_epoch_start:  # the NaN fallback restarts from an epoch start
            p.unlink(missing_ok=True)


def load_latest(work_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; a damaged one is skipped with a warning."""
    for path in reversed(_files(work_dir)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to an older one
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path.name, type(e).__name__)
    return None


def restore(
    payload: dict[str, Any], model: Stateful, optimizer: Any, scheduler: Any, scaler: Any, gens: list[torch.Generator]
) -> LoopState:
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    rng = payload["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for g, state in zip(gens, rng["data"], strict=True):
        g.set_state(state)
    return LoopState(**payload["loop"], best_state=payload["best_state"])


def clear(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)


def keep_epoch_starts_only(work_dir: Path) -> None:
    for p in _files(work_dir):
        if not p.stem.endswith(f"-{EPOCH_START}"):
            p.unlink(missing_ok=True)
