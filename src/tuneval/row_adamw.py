"""AdamW for a parameter whose gradient is zero outside a few rows: the reused word-embedding
gradient (``packed_bert._WordLookup``), on CPU with the native kernels.

MiniLM's [30,522 x 384] word embedding is half of its parameters, but a batch touches a few
hundred rows, and by the end of a 5,000-row Rotten Tomatoes epoch 35% of the rows have ever had
a gradient (24% on average over the epoch). Where a row's gradient, exp_avg and exp_avg_sq are
all zero, an AdamW step is exactly ``param *= 1 - lr * weight_decay``, yet torch's fused AdamW
reads and writes all four arrays there. ``step`` does those rows as that one multiply and the
rest with torch's fused CPU arithmetic (``adamw_rows`` in ``native/cpu_fused.c``).

The moments stay in the optimizer's own ``state[p]``, created as torch creates them, so
``state_dict``, checkpoints and resuming are untouched. Which rows are active is derived from
that state whenever it may have changed behind this module's back (a checkpoint was loaded, or
torch's own step ran on the parameter), so a stale mask can never skip a row with momentum.
"""

from __future__ import annotations

import math
import weakref

import torch

from tuneval import native

# id(param) -> (param, its exp_avg when the mask was made, the state step it is valid for, the
# uint8 mask [rows]); weak references, and keyed by id because tensors compare elementwise.
_MASKS: dict[int, tuple[weakref.ref, weakref.ref, float, torch.Tensor]] = {}


def usable(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> bool:
    """Plain fused float32 AdamW on a 2-D contiguous CPU parameter, with the kernels built."""
    plain = (
        isinstance(optimizer, torch.optim.AdamW)
        and group.get("fused")
        and not any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable"))
    )
    tensors = [p, p.grad, *(v for v in optimizer.state.get(p, {}).values() if v.dim())]
    return bool(
        plain
        and p.dim() == 2
        and all(t is not None and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and all(t.is_contiguous() and t.shape == p.shape for t in tensors)
        and native.library() is not None
    )


def _active(p: torch.Tensor, state: dict, written: torch.Tensor) -> torch.Tensor:
    exp_avg, step = state["exp_avg"], float(state["step"])
    entry = _MASKS.get(id(p))
    if entry is None or entry[0]() is not p or entry[1]() is not exp_avg or entry[2] != step:
        # New, reloaded or stepped elsewhere: the rows where either moment is non-zero.
        mask = ((exp_avg != 0).any(1) | (state["exp_avg_sq"] != 0).any(1)).to(torch.uint8)
    else:
        mask = entry[3]
    mask[written] = 1
    return mask


def _remember(p: torch.Tensor, exp_avg: torch.Tensor, step: float, mask: torch.Tensor) -> None:
    key = id(p)
    _MASKS[key] = (weakref.ref(p, lambda _: _MASKS.pop(key, None)), weakref.ref(exp_avg), step, mask)


@torch.no_grad()
def step(
    optimizer: torch.optim.Optimizer,
    group: dict,
    p: torch.Tensor,
    written: torch.Tensor,
    grad_scale: torch.Tensor | None,
) -> None:
    """One AdamW step of ``p`` (see ``usable``), whose gradient is zero outside rows ``written``.

    Equals torch's fused AdamW on ``p``, grad_scale included, except that the gradient divided by
    it is not stored back into ``p.grad`` (a reused buffer must keep its zero rows zero).
    """
    state = optimizer.state[p]
    if not state:  # as torch.optim.Adam._init_group does for fused
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    mask = _active(p, state, written)
    state["step"] += 1
    t = float(state["step"])
    lr, (beta1, beta2) = float(group["lr"]), group["betas"]
    bias_correction1, bias_correction2 = 1 - beta1**t, 1 - beta2**t
    scale = None if grad_scale is None else grad_scale.to(torch.float32).reshape(())
    native.library().adamw_rows(
        p.data_ptr(), p.grad.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
        mask.data_ptr(), p.shape[0], p.shape[1], 1 - lr * group["weight_decay"], 1 - beta1, beta2, 1 - beta2,
        -(lr / bias_correction1), math.sqrt(bias_correction2), group["eps"],
        None if scale is None else scale.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _remember(p, state["exp_avg"], t, mask)
