"""Several seeds in one fused pass: k models stacked and trained as one batched model.

The k seeds of a seed group share everything but the seed, so their models have the same shapes.
Their parameters are stacked along a new leading dimension and one ``vmap`` over
``functional_call`` runs all k forwards (and, through autograd, all k backwards) per kernel
launch. Each seed keeps what makes it that seed, so its slice equals its solo run to
floating-point tolerance (``tests/test_fused.py``):

- head initialisation: each model is built after ``seed_everything(seed)``, as the solo stage does;
- data order: one generator per seed, the solo loop's ``length_grouped_batches``; at each step the
  k batches are padded to the longest of them (padding is masked), and a seed whose batch is
  shorter (the ragged last batch lands at a random step) gets filler rows of loss weight 0;
- dropout: hashed masks (``hash_dropout``), a function of (seed, call, site, element), the same a
  solo run with hashed dropout draws;
- optimizer: AdamW is elementwise, so one AdamW over the stacked tensors is k AdamWs (same decay
  groups as ``optim.build_optimizer``); gradient-norm clipping is done per seed by hand; the
  learning-rate schedule is shared (same recipe);
- validation, best/last choice, checkpoint artifact, history: per seed.

Supported: classification with an encoder backbone (first-token pooling). Everything else, and
fp16 (its loss scaler is per model), falls back to solo training with the reason logged. A fused
pass is not checkpointed: interrupted, it is rerun (or the seeds train solo, which resume).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneval.config.train import TrainSettings
from tuneval.data.batching import length_grouped_batches, make_collate
from tuneval.training import hash_dropout
from tuneval.training.device import resolve_precision
from tuneval.training.loop import NonFiniteLoss, TrainResult
from tuneval.training.optim import adamw, apply_trainable, decays, linear_schedule

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], dict[str, float]]


class _Step(nn.Module):
    """One seed's loss on one batch, written for vmap: a ready 4D mask (transformers would
    inspect a 2D one with data-dependent Python branches) and per-row loss weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        mask = batch["attention_mask"]
        width = mask.size(-1)
        mask4 = mask[:, None, None, :].bool().expand(-1, 1, width, -1)
        inputs = {k: batch[k] for k in ("input_ids", "token_type_ids") if k in batch}
        hidden = m.backbone(attention_mask=mask4, **inputs).last_hidden_state
        from tuneval.problems.classification import pool

        logits = m.classifier(m.dropout(pool(hidden, mask, m.pooling)))
        weight = batch["weight"]
        ce = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return (ce * weight).sum() / weight.sum()


def why_not(models: list[nn.Module], settings: list[TrainSettings], precision: str) -> str | None:
    """The reason these models cannot be trained fused, or None when they can."""
    if len(models) < 2:
        return "fewer than 2 seeds to train"
    if any(s.model_dump(exclude={"fuse_seeds"}) != settings[0].model_dump(exclude={"fuse_seeds"}) for s in settings):
        return "the seeds' train settings differ"
    m = models[0]
    if not all(hasattr(m, a) for a in ("backbone", "classifier", "pooling", "dropout")):
        return f"{type(m).__name__}: only classification models are fused so far"
    if m.pooling != "first":
        return "a causal-LM classifier (last-token pooling); only encoder backbones are fused so far"
    if precision == "fp16":
        return "fp16 needs a loss scaler per seed; use bf16 or fp32 to fuse"
    shapes = [[(n, p.shape) for n, p in mm.named_parameters()] for mm in models]
    if any(s != shapes[0] for s in shapes):
        return "the seeds' models differ in shape"
    return None


def train_fused(
    models: list[nn.Module],
    seeds: list[int],
    train_ds: Any,
    s: TrainSettings,
    evaluates: list[EvalFn | None],
    pad_id: int,
    padding_side: str,
    device: torch.device,
    progress: bool = True,
    precision: str | None = None,
) -> list[TrainResult]:
    """Train ``models`` (one per seed, each with hashed dropout installed) in place; their
    parameters end as the trained ones. Mirrors ``loop.train`` step for step."""
    from torch.func import functional_call, vmap
    from tqdm.auto import tqdm

    k = len(models)
    precision = precision or resolve_precision(s.precision, device)
    amp_dtype = {"bf16": torch.bfloat16}.get(precision)
    results = [TrainResult(precision=precision) for _ in range(k)]
    for m, r in zip(models, results, strict=True):
        m.to(device)
        r.trainable_parameters = apply_trainable(m, s.trainable)
    stacked, buffers = _stack(models)
    step_module = _Step(models[0])
    params = {f"model.{n}": t for n, t in stacked.items()}
    bufs = {f"model.{n}": t for n, t in buffers.items()}

    def seed_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        return functional_call(step_module, (p, b), (batch,))

    # randomness="error": a random op left in the model (an unswapped dropout) fails loudly.
    losses_of = vmap(seed_loss, in_dims=(0, 0, 0), randomness="error")

    lengths = [len(x) for x in train_ds["input_ids"]]
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    collate = make_collate(pad_id, padding_side, 8 if device.type == "cuda" else None)
    n_batches = math.ceil(len(lengths) / s.batch_size)
    steps_per_epoch = math.ceil(n_batches / s.gradient_accumulation_steps)
    total = steps_per_epoch * s.epochs
    optimizer = _optimizer(models[0], stacked, s, device)
    scheduler = linear_schedule(optimizer, s.warmup_steps, total)
    trainable = [t for t in stacked.values() if t.requires_grad]
    running = torch.zeros(k, device=device)
    running_n = step = 0
    best: list[tuple[float | None, int, dict[str, torch.Tensor] | None]] = [(None, 0, None)] * k
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"finetune x{k}", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(1, s.epochs + 1):
        plans = [length_grouped_batches(lengths, s.batch_size, g, shuffle=True, group=s.group_by_length) for g in gens]
        step_module.train()
        optimizer.zero_grad(set_to_none=True)
        for i in range(n_batches):
            rows = [plan[i] for plan in plans]
            batch = _fused_batch(train_ds, rows, collate, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = losses_of(params, bufs, batch)
            (losses.sum() / s.gradient_accumulation_steps).backward()
            running += losses.detach().float()
            running_n += 1
            for r, idx in zip(results, rows, strict=True):
                r.samples += len(idx)
                r.real_tokens += sum(lengths[j] for j in idx)
            if (i + 1) % s.gradient_accumulation_steps and i + 1 != n_batches:
                continue
            if s.max_grad_norm:
                _clip_per_seed(trainable, s.max_grad_norm)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % s.log_every_steps == 0 or step == total:
                means = (running / running_n).tolist()
                for seed, r, loss in zip(seeds, results, means, strict=True):
                    if not math.isfinite(loss):
                        raise NonFiniteLoss(f"seed {seed}: loss is {loss} at step {step} (epoch {epoch})")
                    r.history.append({"step": step, "epoch": epoch, "loss": loss, "learning_rate": lr})
                running, running_n = torch.zeros(k, device=device), 0
        for j, (m, evaluate) in enumerate(zip(models, evaluates, strict=True)):
            if evaluate is None:
                continue
            metrics = {"epoch": epoch, **evaluate(m)}
            results[j].epochs.append(metrics)
            log.info("seed %d epoch %d validation: %s", seeds[j], epoch, metrics)
            score = metrics.get(s.best_metric)
            if s.checkpoint == "best" and score is not None and (best[j][0] is None or score > best[j][0]):
                best[j] = (score, epoch, {n: v.detach().to("cpu", copy=True) for n, v in m.state_dict().items()})
    bar.close()
    seconds = time.perf_counter() - start
    for m, r, (_, best_epoch, state) in zip(models, results, best, strict=True):
        _own_storage(m)
        r.train_seconds, r.optimizer_steps, r.kept_epoch = seconds, step, s.epochs
        if state is not None:
            m.load_state_dict(state)
            r.kept_epoch = best_epoch
    return results


def _stack(models: list[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack each parameter and buffer over the seeds, then make every model's own tensors views
    of its slice: the optimizer updates the stack and each model sees its seed's weights (for
    validation and saving) without copies."""
    stacked: dict[str, torch.Tensor] = {}
    for name, p0 in models[0].named_parameters():
        t = torch.stack([m.get_parameter(name).detach() for m in models])
        stacked[name] = t.requires_grad_(p0.requires_grad)
    buffers = {name: torch.stack([m.get_buffer(name) for m in models]) for name, _ in models[0].named_buffers()}
    for i, m in enumerate(models):
        for name, t in stacked.items():
            owner, attr = _owner(m, name)
            owner._parameters[attr] = nn.Parameter(t.detach()[i], requires_grad=False)
        for name, t in buffers.items():
            owner, attr = _owner(m, name)
            owner._buffers[attr] = t[i]
    return stacked, buffers


def _own_storage(model: nn.Module) -> None:
    """Give a model its own tensors again (it is saved, or trained on alone, afterwards)."""
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=True)
        for attr, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[attr] = b.clone()


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _optimizer(
    template: nn.Module, stacked: dict[str, torch.Tensor], s: TrainSettings, device: torch.device
) -> torch.optim.AdamW:
    """``optim.build_optimizer``'s groups, decided on the unstacked shapes (ndim < 2: no decay)."""
    params = [(stacked[name], decays(name, p)) for name, p in template.named_parameters()]
    params = [(t, d) for t, d in params if t.requires_grad]
    return adamw([t for t, d in params if d], [t for t, d in params if not d], s, device)


@torch.no_grad()
def _clip_per_seed(tensors: list[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ for each seed's slice: the 2-norm over all of that seed's gradients."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return
    k = grads[0].shape[0]
    norms = torch.stack([g.reshape(k, -1).float().norm(dim=1) for g in grads], dim=1).norm(dim=1)  # (k,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(k, *([1] * (g.ndim - 1))))


def _fused_batch(
    ds: Any, rows: list[list[int]], collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], device: Any
) -> dict[str, torch.Tensor]:
    """The k seeds' batches of one step as (k, B, L) tensors, padded to the longest; a short batch
    is filled with copies of its first row at loss weight 0 (a real row, so no all-masked row)."""
    k, width = len(rows), max(len(r) for r in rows)
    flat = [j for r in rows for j in r + [r[0]] * (width - len(r))]
    weight = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    cols = ds[flat]
    batch = collate([{c: cols[c][i] for c in cols} for i in range(len(flat))])
    out = {c: v.view(k, width, *v.shape[1:]) for c, v in batch.items()}
    out["weight"] = weight
    return {c: v.to(device, non_blocking=True) for c, v in out.items()}


def install_hash_dropout(models: list[nn.Module], seeds: list[int]) -> None:
    for m, seed in zip(models, seeds, strict=True):
        hash_dropout.install(m, seed)
