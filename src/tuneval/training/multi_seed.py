"""Several seeds as one batched model: k models stacked and trained by the one training loop.

The k seeds of a seed group share everything but the seed, so their models have the same shapes.
Their parameters are stacked along a new leading dimension and one ``vmap`` over
``functional_call`` runs all k forwards (and, through autograd, all k backwards) per kernel
launch. ``Stacked`` is the loop's ``Trainee`` for them; the loop itself (``training.loop.run``)
is the solo path's, so each seed keeps what makes it that seed and its slice equals its solo run
to floating-point tolerance (``tests/test_fused.py``):

- head initialisation: each model is built after ``seed_everything(seed)``, as the solo stage does;
- data order: one generator per seed, the loop's ``length_grouped_batches``; at each step the
  k batches are padded to the longest of them (padding is masked), and a seed whose batch is
  shorter (the ragged last batch lands at a random step) gets filler rows of loss weight 0;
- dropout: hashed masks (``hash_dropout``), a function of (seed, call, site, element), the same a
  solo run with hashed dropout draws;
- optimizer: AdamW is elementwise, so one AdamW over the stacked tensors is k AdamWs (same decay
  groups as ``optim.build_optimizer``); gradient-norm clipping is done per seed; the
  learning-rate schedule is shared (same recipe);
- validation, best/last choice, checkpoints, history: the loop's, per seed.

Supported: classification with an encoder backbone (first-token pooling). Everything else, and
fp16 (its loss scaler is per model), falls back to solo training with the reason logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneval.config.train import TrainSettings
from tuneval.training import hash_dropout
from tuneval.training.checkpoints import cpu_copy
from tuneval.training.loop import TrainResult, run
from tuneval.training.optim import adamw, apply_trainable, decays

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
    work_dir: Path | None = None,
) -> list[TrainResult]:
    """Train ``models`` (one per seed, each with hashed dropout installed) in place through the
    training loop; their parameters end as the trained ones. With ``work_dir`` the pass
    checkpoints and resumes like a solo run."""
    trainee = Stacked(models, s, device)
    return run(trainee, train_ds, s, seeds, evaluates, pad_id, padding_side, device, work_dir, progress, precision)


class Stacked:
    """The loop's ``Trainee`` for k same-shaped models: stacked weights, one vmapped loss per step."""

    def __init__(self, models: list[nn.Module], s: TrainSettings, device: torch.device):
        from torch.func import functional_call, vmap

        self.models = models
        self.trainable_parameters = []
        for m in models:
            m.to(device)
            self.trainable_parameters.append(apply_trainable(m, s.trainable))
        self.stacked, self.buffers = _stack(models)
        self.step_module = _Step(models[0])
        self.params = {f"model.{n}": t for n, t in self.stacked.items()}
        self.bufs = {f"model.{n}": t for n, t in self.buffers.items()}

        def seed_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
            return functional_call(self.step_module, (p, b), (batch,))

        # randomness="error": a random op left in the model (an unswapped dropout) fails loudly.
        self.losses_of = vmap(seed_loss, in_dims=(0, 0, 0), randomness="error")
        self.trainable = [t for t in self.stacked.values() if t.requires_grad]

    def optimizer(self, s: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
        return _optimizer(self.models[0], self.stacked, s, device)

    def start(self, dist: Any, device: torch.device, s: TrainSettings) -> None:
        pass  # one process, eager: data parallel and compile are solo-path levers

    def train(self) -> None:
        self.step_module.train()

    def steps(self, ds: Any, plans: list[list[list[int]]], collate: Any, device: torch.device, dist: Any) -> Iterator:
        for rows in zip(*plans, strict=True):
            yield list(rows), _stacked_batch(ds, list(rows), collate, device), 0

    def losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.losses_of(self.params, self.bufs, batch)

    def no_sync(self, dist: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def clip_and_step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float | None
    ) -> None:
        if max_norm:
            _clip_per_seed(self.trainable, max_norm)
        scaler.step(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"params": self.stacked, "buffers": self.buffers}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        # In place: every model's tensors are views of these stacks.
        for name, t in state["params"].items():
            self.stacked[name].copy_(t)
        for name, t in state["buffers"].items():
            self.buffers[name].copy_(t)

    def snapshot(self, j: int) -> dict[str, torch.Tensor]:
        # The whole state: a seed's parameters are views of the stacks and look frozen.
        return cpu_copy(self.models[j].state_dict())

    def restore(self, j: int, state: dict[str, torch.Tensor]) -> None:
        self.models[j].load_state_dict(state)

    def finish(self) -> None:
        for m in self.models:
            _own_storage(m)


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


def _stacked_batch(
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
