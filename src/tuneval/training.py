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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tuneval import checkpoints as ckpt
from tuneval import cpu_memory
from tuneval.batching import length_grouped_batches, make_collate
from tuneval.config.schema import TrainSettings
from tuneval.distributed import SINGLE, Dist
from tuneval.errors import TunevalError
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


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to biases and norm weights (the usual AdamW recipe)."""
    return p.ndim >= 2 and "norm" not in name.lower()


def build_optimizer(model: nn.Module, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return adamw([p for n, p in params if decays(n, p)], [p for n, p in params if not decays(n, p)], s, device)


def adamw(
    decay: list[torch.Tensor], no_decay: list[torch.Tensor], s: TrainSettings, device: torch.device
) -> torch.optim.AdamW:
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on CPU too: the per-tensor loop was a quarter of a MiniLM step on 2 cores (profiled).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        groups, lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_epsilon, fused=fused
    )


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' get_linear_schedule_with_warmup, the reference the recipes are quoted in."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, as ``get_total_norm``, reading only the written rows of
    a reused word-embedding gradient (the rest is zero): 47 of MiniLM's 91 MB of gradients."""
    from tuneval import cpu_kernels
    from tuneval.packed_bert import written_rows

    parts = []
    for g in grads:
        rows = written_rows(g)
        parts.append(g if rows is None else g.index_select(0, rows.unique()))
    if parts and cpu_kernels.available(*parts):
        return torch.tensor(cpu_kernels.sum_of_squares(parts)).sqrt()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in parts]))


def clipped_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, model: nn.Module, max_grad_norm: float | None
) -> None:
    """Clip the gradients' global 2-norm to ``max_grad_norm`` (as ``clip_grad_norm_``), then step.

    A fused AdamW divides each gradient by its ``grad_scale`` as it reads it, so there clipping
    costs only the norm: ``clip_grad_norm_`` would first rewrite every gradient in place, a pass
    over all of them that was 2.7% of a MiniLM CPU step (interleaved A/B). A reused word-embedding
    gradient steps through ``row_adamw`` (rows never touched only decay). The result equals
    clip-then-step to float rounding (tests/test_training.py). fp16's GradScaler owns
    ``grad_scale`` itself, so with it enabled the usual unscale-clip-step runs.
    """
    if not scaler.is_enabled() and optimizer.defaults.get("fused"):
        scale = None
        if max_grad_norm:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            # clip_grad_norm_ multiplies by min(1, max / (norm + 1e-6)); dividing by its inverse is the same.
            scale = torch.clamp((_total_norm(grads) + 1e-6) / max_grad_norm, min=1.0)
        _fused_step(optimizer, scale)
        return
    if max_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)


def _fused_step(optimizer: torch.optim.Optimizer, grad_scale: torch.Tensor | None) -> None:
    """``optimizer.step()`` with each gradient divided by ``grad_scale``; parameters whose gradient
    is a reused word-embedding buffer step through ``row_adamw`` (torch's step skips them: no grad)."""
    from tuneval import row_adamw
    from tuneval.packed_bert import written_rows

    sparse = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            rows = None if p.grad is None else written_rows(p.grad)
            if rows is not None and row_adamw.usable(optimizer, group, p):
                sparse.append((group, p, rows, p.grad))
    for _, p, _, _ in sparse:
        p.grad = None
    if grad_scale is not None:
        optimizer.grad_scale = grad_scale
    try:
        optimizer.step()
    finally:
        if grad_scale is not None:
            del optimizer.grad_scale
        for _, p, _, grad in sparse:
            p.grad = grad
    for group, p, rows, _ in sparse:
        row_adamw.step(optimizer, group, p, rows, grad_scale)


class NonFiniteLoss(TunevalError):
    """The loss became NaN or infinite."""


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
    if device.type == "cpu":
        cpu_memory.keep_freed_memory()
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
            clipped_step(optimizer, scaler, model, s.max_grad_norm)
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
