"""tuneval's own forward of a BERT-family encoder for a [CLS] classification head (a CPU lever).

The same function as ``transformers.BertModel`` followed by taking the first real token (equal
to float rounding, checked in tests/test_bert_cls.py), with the work removed that a [CLS] head
never reads, or done more cheaply:

- **The last layer computes [CLS] only**: keys and values need every token, but queries, the
  attention output, the FFN and both layer norms are needed for the one token the head reads.
- **Cheaper dropout masks on CPU**: 64 random bits give four 16-bit uniforms, so p is rounded to
  a multiple of 1/65536 (0.1 -> 0.1000061) and the kept values are scaled by 1/(1 - that p).
  Masks come from torch's global generator, so a seed and checkpoint/resume stay reproducible.
  On CUDA torch's dropout (Philox) is used unchanged.

Each is an ``Options`` field so that ``benchmarks/step_ab.py`` can time it alone; each stays only
while it measures >= 5% of a CPU step there (dropping padding and reusing the word-embedding
gradient measured -3% and +1-3%, one Q/K/V matmul +0.5%: they were removed). While training with dropout the masks
differ from transformers' (another sample of the same recipe), which is why the forward in use
is part of the finetune cache key (``accel.key_parts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# Model classes whose forward this module reproduces: absolute positions, post-norm layers.
_SUPPORTED = {"BertModel"}


@dataclass(frozen=True)
class Options:
    """Which of the forward's savings apply (all by default; benchmarks time each one alone)."""

    cls_only: bool = True  # the last layer computes the [CLS] rows only
    cheap_dropout: bool = True  # 16-bit uniform masks on CPU (torch's bernoulli otherwise)


@dataclass(frozen=True)
class Forward:
    """What a classifier calls instead of backbone + pooling: ``Forward(options)(backbone, ids, mask, types)``."""

    options: Options = Options()

    def __call__(
        self, backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Any = None
    ) -> torch.Tensor:
        return first_token_states(backbone, input_ids, attention_mask, token_type_ids, self.options)


def supports(backbone: nn.Module, pooling: str) -> bool:
    """Whether ``first_token_states`` computes exactly what ``backbone`` + first-token pooling does."""
    cfg = getattr(backbone, "config", None)
    if type(backbone).__name__ not in _SUPPORTED or pooling != "first" or cfg is None:
        return False
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    # A custom attention function (the multi-seed path's hashed dropout registers one, and swaps
    # the nn.Dropout modules): then the transformers path runs.
    if getattr(cfg, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        return False
    return all(type(m) is nn.Dropout for m in backbone.modules() if isinstance(m, nn.Dropout))


def dropout(x: torch.Tensor, p: float, training: bool, cheap: bool = True) -> torch.Tensor:
    """Inverted dropout; on CPU (``cheap``) with 16-bit uniforms from one int64 draw per four elements."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not cheap:
        return F.dropout(x, p, True)
    threshold = round(p * 65536)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
    keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold - 32768
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - threshold / 65536))


def first_token_states(
    bert: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    options: Options = Options(),
) -> torch.Tensor:
    """The last hidden state of each row's first real token: [batch, hidden]."""
    b, length = input_ids.shape
    real = attention_mask.bool()
    emb = bert.embeddings
    positions = torch.arange(length, device=input_ids.device).expand(b, length)  # as BertModel: pads counted
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    h = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids) + emb.position_embeddings(positions)
    h = dropout(emb.LayerNorm(h), emb.dropout.p, emb.training, options.cheap_dropout)
    first = real.int().argmax(dim=1)  # the first real token, also under left padding
    key_mask = real[:, None, None, :]  # [b, 1, 1, length]: True = attend
    layers = list(bert.encoder.layer)
    for i, layer in enumerate(layers):
        h = _layer(layer, h, key_mask, first if options.cls_only and i == len(layers) - 1 else None, options)
    return h if options.cls_only else h[torch.arange(b, device=h.device), first]


def _layer(
    layer: nn.Module, h: torch.Tensor, key_mask: torch.Tensor, first: torch.Tensor | None, options: Options
) -> torch.Tensor:
    """One post-norm BertLayer on ``h`` [b, length, hidden]; with ``first``, only those tokens: [b, hidden]."""
    att = layer.attention.self
    b, length, hidden = h.shape
    heads, d = att.num_attention_heads, att.attention_head_size
    residual = h if first is None else h[torch.arange(b, device=h.device), first]  # [b, (length,) hidden]
    q = att.query(residual).view(b, -1, heads, d).transpose(1, 2)
    k = att.key(h).view(b, length, heads, d).transpose(1, 2)
    v = att.value(h).view(b, length, heads, d).transpose(1, 2)
    p = att.dropout.p if att.training else 0.0
    ctx = _attention(q, k, v, key_mask, p, att.scaling, options.cheap_dropout)
    ctx = ctx.transpose(1, 2).reshape(residual.shape)
    cheap = options.cheap_dropout
    sub = layer.attention.output
    a = sub.LayerNorm(dropout(sub.dense(ctx), sub.dropout.p, sub.training, cheap) + residual)
    ffn = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a))
    out = layer.output
    return out.LayerNorm(dropout(out.dense(ffn), out.dropout.p, out.training, cheap) + a)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, p: float, scale: float, cheap: bool
) -> torch.Tensor:
    if p == 0.0 or q.device.type != "cpu" or not cheap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p, scale=scale)
    # CPU training: SDPA would draw its dropout with bernoulli; the same math with cheaper masks.
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    probs = dropout(scores.softmax(dim=-1), p, True)
    return torch.matmul(probs, v)
