"""The fine-tuning loop, written out (after HF's *_no_trainer.py examples).

AdamW (decoupled weight decay; no decay on biases and norms), linear warmup then linear decay
to zero, gradient clipping, gradient accumulation, autocast (bf16/fp16) where the device has
it, evaluation after every epoch, and the best or the last epoch's weights kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tuneval.config.train import TrainSettings
from tuneval.data.batching import length_grouped_batches, make_collate
from tuneval.errors import TunevalError
from tuneval.training import checkpoints as ckpt
from tuneval.training.device import resolve_precision
from tuneval.training.distributed import SINGLE, Dist
from tuneval.training.optim import apply_trainable, build_optimizer, clip_and_step, linear_schedule

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


class NonFiniteLoss(TunevalError):
    """The loss became NaN or infinite."""


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
    work_dir: Path | None = None,
    progress: bool = True,
    precision: str | None = None,
    dist: Dist = SINGLE,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``train_ds`` (tokenized, unpadded); return the curves.

    With ``work_dir``, a checkpoint (model, optimizer, scheduler, grad scaler, every RNG, the
    epoch's batch order and the position in it) is written every ``checkpoint_every_steps``
    optimizer steps and at each epoch start, and training resumes from the newest one: a killed run
    continues to the same result as an uninterrupted one.

    Under ``dist`` (data parallel), every rank walks the same global batches and trains on its
    shard of each; rank 0 alone writes checkpoints, evaluates and keeps the best weights.
    """
    from tqdm.auto import tqdm

    result = TrainResult(precision=precision or resolve_precision(s.precision, device))
    model.to(device)
    result.trainable_parameters = apply_trainable(model, s.trainable)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(result.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=result.precision == "fp16")
    lengths = [len(x) for x in train_ds["input_ids"]]
    gen = torch.Generator().manual_seed(seed)
    collate = make_collate(pad_id, padding_side, 8 if device.type == "cuda" else None)
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / s.batch_size) / s.gradient_accumulation_steps)
    total = steps_per_epoch * s.epochs
    optimizer = build_optimizer(model, s, device)
    scheduler = linear_schedule(optimizer, s.warmup_steps, total)
    loop = ckpt.LoopState()
    saved = ckpt.load_latest(work_dir) if work_dir is not None else None
    if saved is not None:
        loop = ckpt.restore(saved[1], model, optimizer, scheduler, scaler, gen)
        log.warning("finetune: resuming from checkpoint %s (epoch %d, step %d)", saved[0].name, loop.epoch, loop.step)
    dist.barrier()  # every rank has read the checkpoint before rank 0 writes and prunes
    save_checkpoints = work_dir is not None and dist.is_main
    result.history, result.epochs = loop.history, loop.epochs
    # Rank 0 checkpoints the running sum over all ranks, so it alone resumes with it.
    running = torch.tensor(loop.running_sum if dist.is_main else 0.0, device=device)
    ddp_model = dist.wrap(model, device)
    # Only the training forward goes through the compiled wrapper; it shares the parameters, so the
    # optimizer, checkpoints, evaluation and the saved model all keep using ``model`` itself.
    forward_model = torch.compile(ddp_model, dynamic=True) if s.compile else ddp_model
    start = time.perf_counter()
    bar = tqdm(
        total=total,
        initial=loop.step,
        desc="finetune",
        unit="step",
        disable=not (progress and dist.is_main),
        dynamic_ncols=True,
    )
    for epoch in range(loop.epoch, s.epochs + 1):
        if loop.epoch != epoch or not loop.batches:  # a fresh epoch (not one resumed part-way)
            loop.epoch, loop.batch_index = epoch, 0
            loop.batches = length_grouped_batches(lengths, s.batch_size, gen, shuffle=True, group=s.group_by_length)
            running = dist.to_main(running)
            if save_checkpoints:
                ckpt.save(
                    work_dir,
                    loop,
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    gen,
                    running,
                    s.keep_checkpoints,
                    epoch_start=True,
                )
        ddp_model.train()
        optimizer.zero_grad(set_to_none=True)
        batches = loop.batches
        for i, (idx, batch, units) in enumerate(
            dist.iterate(train_ds, batches[loop.batch_index :], collate), loop.batch_index
        ):
            share = dist.loss_share(units, device)  # of the global batch's loss; 1.0 in one process
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            last_micro = (i + 1) % s.gradient_accumulation_steps == 0 or i + 1 == len(batches)
            with dist.no_sync(ddp_model, sync=last_micro):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(forward_model, batch)
                scaler.scale(dist.scale_for_backward(loss, share) / s.gradient_accumulation_steps).backward()
            running += loss.detach().float() * share  # summed over ranks: the global batch's mean loss
            loop.running_n += 1
            loop.samples += len(idx)  # the global batch: the same count on every rank
            loop.real_tokens += sum(lengths[j] for j in idx)  # from the host: no device sync
            if not last_micro:
                continue
            clip_and_step(optimizer, scaler, model, s.max_grad_norm)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop.step, loop.batch_index = loop.step + 1, i + 1
            bar.update(1)
            if loop.step % s.log_every_steps == 0 or loop.step == total:
                # The only host sync in the loop: one .item() every log_every_steps steps.
                mean_loss = float(dist.sum(running)) / loop.running_n
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(f"loss is {mean_loss} at step {loop.step} (epoch {epoch})")
                loop.history.append({"step": loop.step, "epoch": epoch, "loss": mean_loss, "learning_rate": lr})
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                running, loop.running_n = torch.zeros((), device=device), 0
            if work_dir is not None and s.checkpoint_every_steps and loop.step % s.checkpoint_every_steps == 0:
                running = dist.to_main(running)
                if save_checkpoints:
                    ckpt.save(work_dir, loop, model, optimizer, scheduler, scaler, gen, running, s.keep_checkpoints)
        if evaluate is not None and dist.is_main:
            metrics = {"epoch": epoch, **evaluate(model)}
            loop.epochs.append(metrics)
            log.info("epoch %d validation: %s", epoch, metrics)
            score = metrics.get(s.best_metric)
            if s.checkpoint == "best" and score is not None and (loop.best_score is None or score > loop.best_score):
                loop.best_score, loop.best_epoch = score, epoch
                loop.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        loop.epoch, loop.batches = epoch + 1, []
    bar.close()
    result.train_seconds = time.perf_counter() - start
    result.optimizer_steps, result.samples, result.real_tokens = loop.step, loop.samples, loop.real_tokens
    result.kept_epoch = s.epochs
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
        result.kept_epoch = loop.best_epoch
    return result
