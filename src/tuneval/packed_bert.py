"""tuneval's own forward of a BERT-family encoder for a [CLS] classification head.

The same function as ``transformers.BertModel`` followed by taking the first real token (equal
to float rounding, checked in tests/test_packed_bert.py), with four kinds of work removed:

- **Padding is dropped** (CPU): every position-wise op (embeddings, Q/K/V, output projections,
  FFN, layer norms, dropout) runs on the real tokens only; only attention sees the padded
  [batch, length] layout. Padding's outputs never reach a real token, so nothing changes.
- **Q, K and V are one matmul** (weights concatenated each call, so gradients reach the three
  original ``nn.Linear`` parameters): one larger GEMM runs closer to peak than three small ones.
- **The last layer computes [CLS] only**: keys and values need every token, but queries, the
  attention output, the FFN and both layer norms are needed for the one token the head reads
  (about 14% of MiniLM's encoder FLOPs, forward and backward).
- **The word-embedding gradient is not re-zeroed whole**: transformers' backward allocates and
  zero-fills the [vocab, hidden] gradient every step (13 ms of a 245 ms MiniLM step, profiled)
  although a batch touches a few hundred rows. Here one buffer is kept and only the rows the last
  step wrote are cleared (``_WordLookup``); the gradient is the same dense tensor.
- **Fused CPU kernels while training** (``cpu_kernels``, ``native/cpu_fused.c``): attention runs
  straight on the packed Q/K/V rows (scale, softmax over each sequence's own tokens, dropout) and
  each sublayer's dropout + residual + LayerNorm is one pass each way, instead of chains of small
  torch ops over a padded copy; the FFN's GELU saves its derivative, so its backward is one
  multiply fused with the bias gradient. Where they cannot be built, the torch ops below run.
- **Cheaper dropout masks on CPU**: torch's CPU bernoulli was 9% of a MiniLM step (profiled);
  here 64 random bits give four 16-bit uniforms, so p is rounded to a multiple of 1/65536
  (0.1 -> 0.1000061) and the kept values are scaled by 1/(1 - that p). Masks come from torch's
  global generator, so a seed and checkpoint/resume stay reproducible. On CUDA torch's dropout
  (Philox) is used unchanged.

While training with dropout the masks differ from transformers' (another sample of the same
recipe), which is why ``train.encoder_kernels`` is part of the finetune cache key.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneval import cpu_kernels, hash_dropout

# Model classes whose forward this module reproduces: absolute positions, post-norm layers.
_SUPPORTED = {"BertModel"}


def supports(backbone: nn.Module, pooling: str) -> bool:
    """Whether ``first_token_states`` computes exactly what ``backbone`` + first-token pooling does."""
    cfg = getattr(backbone, "config", None)
    if type(backbone).__name__ not in _SUPPORTED or pooling != "first" or cfg is None:
        return False
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    # Hashed (fused-seed) dropout replaces the nn.Dropout modules: then the transformers path runs.
    if getattr(cfg, "_attn_implementation", None) == hash_dropout.ATTN_NAME:
        return False
    return all(type(m) is nn.Dropout for m in backbone.modules() if isinstance(m, nn.Dropout))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on CPU with 16-bit uniforms from one int64 draw per four elements."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
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
    pack: bool | None = None,
) -> torch.Tensor:
    """The last hidden state of each row's first real token: [batch, hidden]; ``pack`` (drop
    padding) defaults to on for CPU tensors."""
    b, length = input_ids.shape
    real = attention_mask.bool()
    emb = bert.embeddings
    positions = torch.arange(length, device=input_ids.device).expand(b, length)  # as BertModel: pads counted
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    # CPU: keep real tokens only (the index costs a host sync, free on CPU). CUDA: keep the padded
    # layout, where a sync per step would cost more than the padding saves after length bucketing.
    pack = input_ids.device.type == "cpu" if pack is None else pack
    flat_real = real.reshape(-1)
    index = flat_real.nonzero().squeeze(1) if pack else None

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(b * length, *t.shape[2:])
        return t.index_select(0, index) if index is not None else t

    h = _word_embeddings(emb.word_embeddings, take(input_ids)) + emb.token_type_embeddings(take(token_type_ids))
    h = h + emb.position_embeddings(take(positions))
    h = dropout(emb.LayerNorm(h), emb.dropout.p, emb.training)
    # Row b's first real token, as a row of h. Packing keeps order, so it opens row b's segment.
    if index is not None:
        lengths = real.sum(dim=1)
        cls_rows = torch.cumsum(lengths, 0) - lengths
    else:
        cls_rows = torch.arange(b, device=input_ids.device) * length + real.int().argmax(dim=1)
    key_mask = real[:, None, None, :]  # [b, 1, 1, length]: True = attend
    layers = list(bert.encoder.layer)
    # The fused CPU kernels pay while training (dropout, saved activations); for inference SDPA's
    # CPU flash kernel was faster (interleaved A/B, batches of 64: 269 vs 289 ms).
    att = layers[0].attention.self
    # Autocast would hand them bf16/fp16 activations: float32 kernels, so not under autocast.
    train = bert.training and torch.is_grad_enabled() and not torch.is_autocast_enabled(h.device.type)
    if index is not None and train and att.attention_head_size % 8 == 0 and cpu_kernels.available(h):
        segments = (cpu_kernels.Segments.of(lengths), cpu_kernels.Segments.of(lengths, "first"))
        for i, layer in enumerate(layers):
            h = _fused_layer(layer, h, segments, cls_rows if i == len(layers) - 1 else None)
        return h
    for i, layer in enumerate(layers):
        h = _layer(layer, h, index, b, length, key_mask, cls_rows if i == len(layers) - 1 else None)
    return h


def _fused_layer(
    layer: nn.Module,
    h: torch.Tensor,
    segments: tuple[cpu_kernels.Segments, cpu_kernels.Segments],
    cls_rows: torch.Tensor | None,
) -> torch.Tensor:
    """``_layer`` on packed CPU rows with the fused kernels: attention straight on the packed
    Q/K/V rows, and each sublayer's dropout + residual + LayerNorm in one pass."""
    att = layer.attention.self
    heads, d = att.num_attention_heads, att.attention_head_size
    residual, queries, kv = _projections(att, h, cls_rows)
    # Without [CLS] queries kv is the whole Q|K|V matrix; with them, K|V.
    cols, seg = ((0, heads * d, 2 * heads * d), segments[0]) if queries is None else ((0, 0, heads * d), segments[1])
    ctx = cpu_kernels.attention(queries, kv, cols, seg, heads, d, att.scaling, att.dropout.p, att.training)
    return _after_attention(layer, ctx, residual, fused=True)


def _layer(
    layer: nn.Module,
    h: torch.Tensor,
    index: torch.Tensor | None,
    b: int,
    length: int,
    key_mask: torch.Tensor,
    cls_rows: torch.Tensor | None,
) -> torch.Tensor:
    """One post-norm BertLayer on token rows ``h``; with ``cls_rows``, return only those rows."""
    att = layer.attention.self
    heads, d = att.num_attention_heads, att.attention_head_size
    hidden = heads * d
    residual, queries, kv = _projections(att, h, cls_rows)
    if queries is None:
        q_rows, kv = kv[:, :hidden], kv[:, hidden:]
    else:
        q_rows = queries
    kv = _pad(kv, index, b, length).view(b, length, 2, heads, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    if cls_rows is None:
        q = _pad(q_rows, index, b, length).view(b, length, heads, d).transpose(1, 2)
    else:
        q = q_rows.view(b, 1, heads, d).transpose(1, 2)
    ctx = _attention(q, k, v, key_mask, att.dropout.p if att.training else 0.0, att.scaling)
    ctx = ctx.transpose(1, 2).reshape(b * q.shape[2], hidden)
    if cls_rows is None and index is not None:
        ctx = ctx.index_select(0, index)
    return _after_attention(layer, ctx, residual, fused=False)


def _projections(
    att: nn.Module, h: torch.Tensor, cls_rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A layer's Q/K/V projections in one matmul: (residual, queries, kv).

    Without ``cls_rows``: queries is None and kv the [tokens, 3 * hidden] Q|K|V matrix. With them
    (the last layer): queries for those rows only, and kv the K|V of every token.
    """
    hidden = att.num_attention_heads * att.attention_head_size
    w = torch.cat([att.query.weight, att.key.weight, att.value.weight])
    bias = torch.cat([att.query.bias, att.key.bias, att.value.bias])
    if cls_rows is None:
        return h, None, F.linear(h, w, bias)
    residual = h.index_select(0, cls_rows)
    return residual, F.linear(residual, w[:hidden], bias[:hidden]), F.linear(h, w[hidden:], bias[hidden:])


def _add_norm(y: torch.Tensor, residual: torch.Tensor, sub: nn.Module) -> torch.Tensor:
    return sub.LayerNorm(dropout(y, sub.dropout.p, sub.training) + residual)


def _fused_add_norm(y: torch.Tensor, residual: torch.Tensor, sub: nn.Module) -> torch.Tensor:
    return cpu_kernels.dropout_add_norm(y, residual, sub.LayerNorm, sub.dropout.p, sub.training)


def _after_attention(layer: nn.Module, ctx: torch.Tensor, residual: torch.Tensor, fused: bool) -> torch.Tensor:
    """The attention output projection and the FFN, each closed by dropout + residual + LayerNorm."""
    add_norm = _fused_add_norm if fused else _add_norm
    a = add_norm(layer.attention.output.dense(ctx), residual, layer.attention.output)
    act = layer.intermediate.intermediate_act_fn
    if fused and _is_erf_gelu(act):
        ffn = cpu_kernels.linear_gelu(a, layer.intermediate.dense)
    else:
        ffn = act(layer.intermediate.dense(a))
    return add_norm(layer.output.dense(ffn), a, layer.output)


def _is_erf_gelu(act: Callable) -> bool:
    """transformers' "gelu" (GELUActivation over F.gelu, erf form): what linear_gelu computes."""
    from transformers.activations import GELUActivation

    return isinstance(act, GELUActivation) and act.act is F.gelu


def _pad(rows: torch.Tensor, index: torch.Tensor | None, b: int, length: int) -> torch.Tensor:
    """Packed token rows back to the [b * length, ...] layout attention needs (zeros at padding)."""
    if index is None:
        return rows
    padded = rows.new_zeros(b * length, rows.shape[1])
    return padded.index_copy(0, index, rows)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, p: float, scale: float
) -> torch.Tensor:
    if p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p, scale=scale)
    # CPU training: SDPA would draw its dropout with bernoulli; the same math with cheaper masks.
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    probs = dropout(scores.softmax(dim=-1), p, True)
    return torch.matmul(probs, v)


def written_rows(grad: torch.Tensor) -> torch.Tensor | None:
    """The rows outside which ``grad`` is known to be zero (a reused word-embedding gradient, see
    ``_WordLookup``), or None when that is not known. Clipping reads these rows, not 30k."""
    ref = getattr(grad, "_tuneval_grad_buffer", None)
    buf = ref() if ref is not None else None
    if buf is None or buf.tensor is not grad or buf.rows is None:
        return None
    return buf.rows


class _GradBuffer:
    """A word-embedding gradient kept between steps, and the rows its last use wrote."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # None: unknown, clear it all


class _WordLookup(torch.autograd.Function):
    """``F.embedding`` whose backward writes ``weight.grad`` itself, into a reused buffer.

    When the step starts with ``weight.grad`` None (zero_grad(set_to_none=True), as the loop
    does), the buffer is zero except the rows the previous step wrote: clearing those and adding
    this batch's rows gives exactly the dense gradient a fresh zero tensor would. Otherwise
    (accumulation, or grads not set to None) it adds into the existing ``weight.grad``.
    Clipping and unscaling scale ``.grad`` in place, which keeps the zero rows zero, except by a
    NaN factor (clipping after a NaN anywhere): the padding row, never written, is the sentinel
    that it stayed zero, and the whole buffer is cleared when it did not.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int, buffer: _GradBuffer) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx, ctx.buffer = weight, padding_idx, buffer
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, None, None, None]:
        (ids,) = ctx.saved_tensors
        weight, buf = ctx.weight, ctx.buffer
        grad_out = grad_out.reshape(-1, weight.shape[1]).to(weight.dtype)
        ids = ids.reshape(-1)
        # As nn.Embedding: no gradient for the padding row (which is also the buffer's sentinel).
        grad_out = grad_out.masked_fill((ids == ctx.padding_idx)[:, None], 0.0)
        if weight.grad is None:
            t = buf.tensor
            if t is None or t.shape != weight.shape or t.dtype != weight.dtype or t.device != weight.device:
                t = buf.tensor = torch.zeros_like(weight)
                t._tuneval_grad_buffer = weakref.ref(buf)  # for written_rows()
            elif buf.rows is None or not bool((t[ctx.padding_idx] == 0).all()):
                t.zero_()
            else:
                t.index_fill_(0, buf.rows, 0.0)
            t.index_add_(0, ids, grad_out)
            buf.rows = ids
            weight.grad = t
        else:
            weight.grad.index_add_(0, ids, grad_out)
            if weight.grad is buf.tensor and buf.rows is not None and buf.rows.numel() < weight.shape[0]:
                buf.rows = torch.cat([buf.rows, ids])
            else:
                buf.rows = None
        return None, None, None, None


def _word_embeddings(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """The word-embedding lookup; with the reused gradient buffer where autograd hooks allow it."""
    weight = embedding.weight
    plain = (
        not (torch.is_grad_enabled() and weight.requires_grad)
        # Hooks (and DDP's reducer) watch AccumulateGrad, which this skips.
        or weight._backward_hooks
        or getattr(weight, "_post_accumulate_grad_hooks", None)
        or (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.compiler.is_compiling()
        or embedding.max_norm is not None
        # CPU only: the sentinel check reads the device, and on a GPU the zero-fill is cheap anyway.
        or weight.device.type != "cpu"
        or embedding.padding_idx is None
        or embedding.sparse
    )
    if plain:
        return embedding(ids)
    buf = embedding.__dict__.setdefault("_tuneval_grad_buffer", _GradBuffer())
    return _WordLookup.apply(ids, weight, embedding.padding_idx, buf)
