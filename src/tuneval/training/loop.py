"""The fine-tuning loop, written out once (after HF's *_no_trainer.py examples).

AdamW (decoupled weight decay; no decay on biases and norms), linear warmup then linear decay
to zero, gradient clipping, gradient accumulation, autocast (bf16/fp16) where the device has
it, evaluation after every epoch, and the best or the last epoch's weights kept.

``run`` trains a ``Trainee``: one model (``train``, the solo path; under ``Dist`` the
data-parallel path too), or k seeds as one batched model (``multi_seed.train_fused``). The
epoch/step/validation/best-epoch code is this one; per seed it keeps the data order (its own
generator), the curves, the validation results and the best epoch.
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
from tuneval.training.optim import linear_schedule
from tuneval.training.trainee import LossFn, Solo, Trainee

log = logging.getLogger(__name__)

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
    trainee = Solo(model, loss_fn, s, device)
    [result] = run(
        trainee, train_ds, s, [seed], [evaluate], pad_id, padding_side, device, work_dir, progress, precision, dist
    )
    return result


def run(
    trainee: Trainee,
    train_ds: Any,
    s: TrainSettings,
    seeds: list[int],
    evaluates: list[EvalFn | None],
    pad_id: int,
    padding_side: str,
    device: torch.device,
    work_dir: Path | None = None,
    progress: bool = True,
    precision: str | None = None,
    dist: Dist = SINGLE,
) -> list[TrainResult]:
    """Train ``trainee``'s seeds (one per entry of ``seeds``) in place; return each seed's curves."""
    from tqdm.auto import tqdm

    k = len(seeds)
    precision = precision or resolve_precision(s.precision, device)
    results = [TrainResult(precision=precision, trainable_parameters=n) for n in trainee.trainable_parameters]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lengths = [len(x) for x in train_ds["input_ids"]]
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    collate = make_collate(pad_id, padding_side, 8 if device.type == "cuda" else None)
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / s.batch_size) / s.gradient_accumulation_steps)
    total = steps_per_epoch * s.epochs
    optimizer = trainee.optimizer(s, device)
    scheduler = linear_schedule(optimizer, s.warmup_steps, total)
    loop = ckpt.LoopState.fresh(k)
    saved = ckpt.load_latest(work_dir) if work_dir is not None else None
    if saved is not None:
        loop = ckpt.restore(saved[1], trainee, optimizer, scheduler, scaler, gens)
        log.warning("finetune: resuming from checkpoint %s (epoch %d, step %d)", saved[0].name, loop.epoch, loop.step)
    dist.barrier()  # every rank has read the checkpoint before rank 0 writes and prunes
    save_checkpoints = work_dir is not None and dist.is_main

    def checkpoint(running: torch.Tensor, epoch_start: bool = False) -> torch.Tensor:
        # Rank 0 checkpoints the running sum over all ranks, so it alone resumes with it.
        running = dist.to_main(running)
        if save_checkpoints:
            ckpt.save(
                work_dir, loop, trainee, optimizer, scheduler, scaler, gens, running, s.keep_checkpoints, epoch_start
            )
        return running

    running = torch.tensor(loop.running_sum if dist.is_main else [0.0] * k, device=device)
    trainee.start(dist, device, s)
    start = time.perf_counter()
    desc = "finetune" if k == 1 else f"finetune x{k}"
    bar = tqdm(
        total=total,
        initial=loop.step,
        desc=desc,
        unit="step",
        disable=not (progress and dist.is_main),
        dynamic_ncols=True,
    )
    for epoch in range(loop.epoch, s.epochs + 1):
        if loop.epoch != epoch or not loop.batches:  # a fresh epoch (not one resumed part-way)
            loop.epoch, loop.batch_index = epoch, 0
            loop.batches = [
                length_grouped_batches(lengths, s.batch_size, g, shuffle=True, group=s.group_by_length) for g in gens
            ]
            if work_dir is not None:
                running = checkpoint(running, epoch_start=True)
        trainee.train()
        optimizer.zero_grad(set_to_none=True)
        n_batches = len(loop.batches[0])
        plans = [b[loop.batch_index :] for b in loop.batches]
        for i, (rows, batch, units) in enumerate(
            trainee.steps(train_ds, plans, collate, device, dist), loop.batch_index
        ):
            share = dist.loss_share(units, device)  # of the global batch's loss; 1.0 in one process
            last_micro = (i + 1) % s.gradient_accumulation_steps == 0 or i + 1 == n_batches
            with trainee.no_sync(dist, sync=last_micro):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = trainee.losses(batch)  # (k,): the seeds' losses are independent
                scaler.scale(dist.scale_for_backward(losses.sum(), share) / s.gradient_accumulation_steps).backward()
            running += losses.detach().float() * share  # summed over ranks: the global batch's mean loss
            loop.running_n += 1
            for j, idx in enumerate(rows):
                loop.samples[j] += len(idx)  # the global batch: the same count on every rank
                loop.real_tokens[j] += sum(lengths[t] for t in idx)  # from the host: no device sync
            if not last_micro:
                continue
            trainee.clip_and_step(optimizer, scaler, s.max_grad_norm)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop.step, loop.batch_index = loop.step + 1, i + 1
            bar.update(1)
            if loop.step % s.log_every_steps == 0 or loop.step == total:
                # The only host sync in the loop: one .tolist() every log_every_steps steps.
                means = [float(x) / loop.running_n for x in dist.sum(running).tolist()]
                for seed, history, mean_loss in zip(seeds, loop.history, means, strict=True):
                    if not math.isfinite(mean_loss):
                        who = f"seed {seed}: " if k > 1 else ""
                        raise NonFiniteLoss(f"{who}loss is {mean_loss} at step {loop.step} (epoch {epoch})")
                    history.append({"step": loop.step, "epoch": epoch, "loss": mean_loss, "learning_rate": lr})
                bar.set_postfix(loss=f"{means[0]:.4f}")
                running, loop.running_n = torch.zeros(k, device=device), 0
            if work_dir is not None and s.checkpoint_every_steps and loop.step % s.checkpoint_every_steps == 0:
                running = checkpoint(running)
        if dist.is_main:
            _validate(trainee, evaluates, seeds, loop, epoch, s)
        loop.epoch, loop.batches = epoch + 1, []
    bar.close()
    seconds = time.perf_counter() - start
    trainee.finish()
    for j, r in enumerate(results):
        r.history, r.epochs, r.train_seconds, r.kept_epoch = loop.history[j], loop.epochs[j], seconds, s.epochs
        r.optimizer_steps, r.samples, r.real_tokens = loop.step, loop.samples[j], loop.real_tokens[j]
        if loop.best_state[j] is not None:
            trainee.restore(j, loop.best_state[j])
            r.kept_epoch = loop.best_epoch[j]
    return results


def _validate(
    trainee: Trainee,
    evaluates: list[EvalFn | None],
    seeds: list[int],
    loop: ckpt.LoopState,
    epoch: int,
    s: TrainSettings,
) -> None:
    """Each seed's validation after an epoch, and its best epoch's weights (``checkpoint: best``)."""
    for j, (model, evaluate) in enumerate(zip(trainee.models, evaluates, strict=True)):
        if evaluate is None:
            continue
        metrics = {"epoch": epoch, **evaluate(model)}
        loop.epochs[j].append(metrics)
        log.info("seed %d epoch %d validation: %s", seeds[j], epoch, metrics)
        score = metrics.get(s.best_metric)
        if s.checkpoint == "best" and score is not None and (loop.best_score[j] is None or score > loop.best_score[j]):
            loop.best_score[j], loop.best_epoch[j] = score, epoch
            loop.best_state[j] = trainee.snapshot(j)
