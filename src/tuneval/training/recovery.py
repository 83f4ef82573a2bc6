"""The training loop's recoveries: out-of-memory halves the micro-batch, a NaN under fp16 retries in fp32."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tuneval.config.train import TrainSettings
from tuneval.errors import TunevalError
from tuneval.training import checkpoints as ckpt
from tuneval.training.device import resolve_precision
from tuneval.training.distributed import SINGLE, Dist
from tuneval.training.loop import EvalFn, LossFn, NonFiniteLoss, TrainResult, train

log = logging.getLogger(__name__)


def fit(
    model: nn.Module,
    train_ds: Any,
    s: TrainSettings,
    seed: int,
    loss_fn: LossFn,
    evaluate: EvalFn | None,
    pad_id: int,
    padding_side: str,
    device: torch.device,
    work_dir: Path | None = None,
    progress: bool = True,
    dist: Dist = SINGLE,
) -> TrainResult:
    """``train`` plus the recoveries: CUDA out-of-memory halves the micro-batch and doubles gradient
    accumulation (same effective batch); a NaN loss under fp16 retries from the last epoch start in
    fp32, once (every rank sees the same all-reduced loss, so all ranks retry together)."""
    settings, precision = s, resolve_precision(s.precision, device)
    retried_nan = False
    while True:
        try:
            return train(
                model,
                train_ds,
                settings,
                seed,
                loss_fn,
                evaluate,
                pad_id,
                padding_side,
                device,
                work_dir,
                progress,
                precision=precision,
                dist=dist,
            )
        except torch.OutOfMemoryError:
            if dist.active:  # the other ranks sit in a collective; torchrun stops them all
                raise TunevalError(
                    f"finetune: out of memory on one of {dist.world_size} devices; lower train.batch_size "
                    "(each device takes batch_size / devices rows) or use more gradient_accumulation_steps"
                ) from None
            if settings.batch_size == 1:
                raise TunevalError(
                    "finetune: out of memory even at batch_size 1; use a smaller model, "
                    "a shorter max_length or precision bf16"
                ) from None
            settings = settings.model_copy(
                update={
                    "batch_size": settings.batch_size // 2,
                    "gradient_accumulation_steps": settings.gradient_accumulation_steps * 2,
                }
            )
            log.warning(
                "finetune: out of memory; retrying with batch_size %d x %d accumulation steps (same effective batch)",
                settings.batch_size,
                settings.gradient_accumulation_steps,
            )
            if work_dir is not None:
                ckpt.clear(work_dir)  # checkpoints of another micro-batch size cannot be resumed exactly
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except NonFiniteLoss as e:
            if precision != "fp16" or retried_nan:
                raise TunevalError(
                    f"finetune: {e}; lower train.learning_rate, set train.max_grad_norm, or use precision fp32"
                ) from None
            retried_nan, precision = True, "fp32"
            log.warning("finetune: %s under fp16; retrying from the last epoch start in fp32", e)
            if work_dir is not None and dist.is_main:
                ckpt.keep_epoch_starts_only(work_dir)
