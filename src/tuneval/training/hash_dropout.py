"""Counter-based dropout: each mask is a pure function of (seed, call count, site, element index).

torch's dropout draws from the global RNG, so under ``vmap`` the k seeds of a fused run get other
masks than k solo runs would. Here a mask is an integer hash of where and when it is drawn, kept in
a per-module buffer ``[seed, calls]``: a solo run and its slice of a fused run draw the very same
masks, and the buffer rides along in checkpoints, so resume stays exact. Attention-probability
dropout (done inside the attention function, not by a module) goes through ``hash_attention``,
registered with transformers as the attention implementation ``tuneval_hash``: eager attention
with the hashed mask while training with dropout (and under vmap), SDPA otherwise (evaluation
is unchanged).

Integer arithmetic is int64 with every value kept below 2**31 before a multiply, so nothing
overflows and CPU and CUDA agree.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

ATTN_NAME = "tuneval_hash"
_M = 0x7FFFFFFF  # values stay in [0, 2**31)
_C = 0x45D9F3B  # odd multiplier < 2**31: products stay below 2**62


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**31) that spreads every input bit over the output."""
    h = (h ^ (h >> 16)) * _C & _M
    h = (h ^ (h >> 16)) * _C & _M
    return h ^ (h >> 16)


def keep_mask(shape: torch.Size, state: torch.Tensor, site: int, p: float) -> torch.Tensor:
    """Bool mask (True = keep, probability 1 - p) for a tensor of ``shape``; ``state`` = [seed, calls].

    Hashed per coordinate, one dimension after the other, never by flat index: an element keeps its
    mask when the tensor around it is padded (more rows, a longer sequence), as a fused batch is.
    """
    h = _mix(_mix(_mix(state[0] & _M) ^ site) ^ (state[1] & _M))
    for dim, n in enumerate(shape):
        view = [1] * len(shape)
        view[dim] = n
        h = _mix(h ^ torch.arange(n, device=state.device, dtype=torch.int64).view(view))
    # 24 high bits -> a float32 in [0, 1) exactly.
    return (h >> 7).to(torch.float32) * (1.0 / (1 << 24)) >= p


class HashDropout(nn.Module):
    """nn.Dropout with hashed masks; ``p`` and ``training`` behave as nn.Dropout's."""

    def __init__(self, p: float, seed: int, site: int):
        super().__init__()
        self.p, self.site = float(p), site
        self.register_buffer("hash_state", torch.tensor([seed & _M, 0], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = keep_mask(x.shape, self.hash_state.to(x.device), self.site, self.p)
        # In place: under vmap this advances each seed's counter inside the stacked buffer.
        self.hash_state[1:].add_(1)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def hash_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention with the module's HashDropout on the probabilities while training, and under
    vmap (a fused pass: batched matmuls, no reliance on SDPA batching rules); SDPA otherwise."""
    drop = _attention_dropout(module) if module.training and dropout > 0.0 else None
    if drop is None and not torch._C._functorch.is_batchedtensor(query):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if drop is not None:
        probs = drop(probs)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _attention_dropout(module: nn.Module) -> HashDropout | None:
    for name in ("dropout", "attn_dropout", "attention_dropout"):
        d = getattr(module, name, None)
        if isinstance(d, HashDropout):
            return d
    return None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_NAME, hash_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # bool masks, as SDPA takes them


def install(model: nn.Module, seed: int) -> int:
    """Swap every nn.Dropout of ``model`` for a HashDropout of the same p, seeded with ``seed``;
    route attention through ``tuneval_hash``. Return the number of sites. Sites are numbered in
    module order, so two models of one architecture number them alike."""
    _register()
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Dropout)
    ]
    for site, (parent, name, child) in enumerate(swaps):
        setattr(parent, name, HashDropout(child.p, seed, site).to(_device_of(model)).train(child.training))
    for config in _configs(model):
        config._tuneval_attn_before = config._attn_implementation
        config._attn_implementation = ATTN_NAME
    return len(swaps)


def uninstall(model: nn.Module) -> None:
    """Back to plain nn.Dropout and the original attention (before saving: no extra buffers)."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, HashDropout)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, nn.Dropout(child.p).train(child.training))
    for config in _configs(model):
        before = getattr(config, "_tuneval_attn_before", None)
        if before is not None:
            config._attn_implementation = before
            del config._tuneval_attn_before


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
