"""The fine-tuning loop, written out (after HF's *_no_trainer.py examples).

AdamW (decoupled weight decay; no decay on biases and norms), linear warmup then linear decay
to zero, gradient clipping, gradient accumulation, autocast (bf16/fp16) where the device has
it, evaluation after every epoch, and the best or the last epoch's weights kept.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tuneval.batching import iterate, length_grouped_batches, make_collate
from tuneval.config.schema import TrainSettings
from tuneval.models import layer_stack

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged step
    epochs: list[dict[str, float]] = field(default_factory=list)  # validation metrics per epoch
    kept_epoch: int = 0
    train_seconds: float = 0.0
    samples: int = 0
    real_tokens: int = 0
    optimizer_steps: int = 0
    trainable_parameters: int = 0
    precision: str = "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 on CUDA cards that have it, else fp16 on CUDA, fp32 on CPU."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def apply_trainable(model: nn.Module, trainable: Any) -> int:
    """Freeze per ``trainable`` (all | head | top_k: N); return the count of trainable parameters."""
    backbone = getattr(model, "backbone", None)
    if trainable != "all" and backbone is not None:
        for p in backbone.parameters():
            p.requires_grad_(False)
        if not isinstance(trainable, str):  # TopK
            layers = layer_stack(backbone)
            for layer in list(layers)[-trainable.top_k :]:
                for p in layer.parameters():
                    p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_optimizer(model: nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_epsilon, fused=device.type == "cuda"
    )


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' get_linear_schedule_with_warmup, the reference the recipes are quoted in."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def train(
    model: nn.Module,
    train_ds: Any,
    s: TrainSettings,
    seed: int,
    loss_fn: LossFn,
    evaluate: EvalFn | None,
    pad_id: int,
    padding_side: str,
    device: torch.device,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``train_ds`` (tokenized, unpadded); return the curves."""
    from tqdm.auto import tqdm

    result = TrainResult(precision=resolve_precision(s.precision, device))
    model.to(device)
    result.trainable_parameters = apply_trainable(model, s.trainable)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(result.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=result.precision == "fp16")
    lengths = [len(x) for x in train_ds["input_ids"]]
    gen = torch.Generator().manual_seed(seed)
    collate = make_collate(pad_id, padding_side, 8 if device.type == "cuda" else None)
    batches_per_epoch = math.ceil(len(lengths) / s.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / s.gradient_accumulation_steps)
    total = steps_per_epoch * s.epochs
    optimizer = build_optimizer(model, s, device)
    scheduler = linear_schedule(optimizer, s.warmup_steps, total)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    step, running, running_n = 0, torch.zeros((), device=device), 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(1, s.epochs + 1):
        model.train()
        batches = length_grouped_batches(lengths, s.batch_size, gen, shuffle=True, group=s.group_by_length)
        optimizer.zero_grad(set_to_none=True)
        for i, (_, batch) in enumerate(iterate(train_ds, batches, collate)):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model, batch)
            scaler.scale(loss / s.gradient_accumulation_steps).backward()
            running += loss.detach()
            running_n += 1
            result.samples += batch["input_ids"].size(0)
            result.real_tokens += int(batch["attention_mask"].sum())
            if (i + 1) % s.gradient_accumulation_steps and i + 1 != len(batches):
                continue
            if s.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % s.log_every_steps == 0 or step == total:
                # The only host sync in the loop: one .item() every log_every_steps steps.
                mean_loss = float(running) / running_n
                result.history.append({"step": step, "epoch": epoch, "loss": mean_loss, "learning_rate": lr})
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                running, running_n = torch.zeros((), device=device), 0
        if evaluate is not None:
            metrics = {"epoch": epoch, **evaluate(model)}
            result.epochs.append(metrics)
            log.info("epoch %d validation: %s", epoch, metrics)
            if s.checkpoint == "best":
                score = metrics.get(s.best_metric)
                if score is not None and (best is None or score > best[0]):
                    best = (score, epoch, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    bar.close()
    result.train_seconds = time.perf_counter() - start
    result.optimizer_steps = step
    result.kept_epoch = s.epochs
    if best is not None:
        model.load_state_dict(best[2])
        result.kept_epoch = best[1]
    return result
