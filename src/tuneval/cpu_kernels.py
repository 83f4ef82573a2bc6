"""Autograd ops over the fused CPU kernels (``tuneval.native``), for ``packed_bert``'s CPU path.

Three ops replace chains of small torch ops, each a pass over memory plus a dispatch:

- ``dropout_add_norm``: ``LayerNorm(dropout(y) + residual)``, a BERT layer's two sublayer exits.
- ``linear_gelu``: the FFN's first linear layer and its GELU, with GELU's derivative saved.
- ``attention``: multi-head attention straight on packed token rows (scale, softmax over each
  sequence's own tokens, dropout on the probabilities), so the padded [batch, heads, length, d]
  copies, transposes and masks of the torch version are never built.

Dropout masks are a hash of (seed, element index) with the seed drawn from torch's generator per
call: runs stay seeded and resumable, and ``keep_reference`` recomputes a mask in torch ops for the
tests. p is rounded to a multiple of 1/65536, as ``packed_bert.dropout`` does.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from tuneval import native


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors: built here, CPU, float32 (attention also needs
    a head size that is a multiple of 8)."""
    return native.library() is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _check(*tensors: torch.Tensor | None) -> None:
    # The kernels read raw float32 memory: anything else must fail here, not corrupt memory there.
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise TypeError(f"fused CPU kernels take float32 CPU tensors, got {t.dtype} on {t.device}")


def threshold(p: float, training: bool) -> tuple[int, float]:
    """(16-bit drop threshold, scale of kept values); (0, 1.0) = no dropout."""
    t = round(p * 65536) if training else 0
    return t, (1.0 / (1.0 - t / 65536) if t else 1.0)


def draw_seed() -> int:
    return int(torch.empty((), dtype=torch.int64).random_())  # one draw from torch's generator


def _mix32(x: torch.Tensor) -> torch.Tensor:
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def keep_reference(seed: int, start: int, n: int, thresh: int) -> torch.Tensor:
    """The kernels' keep mask for flat indices start..start+n (mod 2**32), in torch ops (int64 holding uint32)."""
    idx = torch.arange(start, start + n, dtype=torch.int64) & 0xFFFFFFFF
    h = _mix32((idx + (seed & 0xFFFFFFFF)) & 0xFFFFFFFF)
    h = _mix32(h ^ ((seed >> 32) & 0xFFFFFFFF))
    return (h >> 16) >= thresh


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def sum_of_squares(tensors: list[torch.Tensor]) -> float:
    """The sum of squares of every element of ``tensors`` (float32 CPU), in one multithreaded call."""
    _check(*tensors)
    parts = [t.contiguous() for t in tensors]
    ptrs = (ctypes.c_void_p * len(parts))(*[t.data_ptr() for t in parts])
    lens = (ctypes.c_long * len(parts))(*[t.numel() for t in parts])
    return native.library().sumsq_many(ptrs, lens, len(parts), torch.get_num_threads())


class _DropoutAddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, residual, weight, bias, eps: float, thresh: int, dscale: float, seed: int):
        y, residual = y.contiguous(), residual.contiguous()
        rows, hidden = y.shape
        out, xhat, rstd = torch.empty_like(y), torch.empty_like(y), y.new_empty(rows)
        keep = torch.empty((rows, hidden), dtype=torch.uint8) if thresh else None
        native.library().dal_forward(
            y.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
            xhat.data_ptr(), rstd.data_ptr(), _ptr(keep), rows, hidden, eps, seed, thresh, dscale,
            torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(xhat, rstd, weight, keep)
        ctx.dscale = dscale
        return out

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight, keep = ctx.saved_tensors
        grad = grad.contiguous()
        rows, hidden = grad.shape
        dy, dres = torch.empty_like(grad), torch.empty_like(grad)
        dweight, dbias = torch.empty_like(weight), torch.empty_like(weight)
        native.library().dal_backward(
            grad.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), weight.data_ptr(), _ptr(keep), ctx.dscale,
            dy.data_ptr(), dres.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), rows, hidden,
            torch.get_num_threads(),
        )  # fmt: skip
        return dy, dres, dweight, dbias, None, None, None, None


def dropout_add_norm(
    y: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm, p: float, training: bool, seed: int | None = None
) -> torch.Tensor:
    """``norm(dropout(y) + residual)`` over rows [tokens, hidden] in one pass each way."""
    _check(y, residual, norm.weight, norm.bias)
    if y.shape != residual.shape or y.dim() != 2 or norm.weight.shape != (y.shape[1],):
        raise ValueError(
            f"dropout_add_norm: shapes {tuple(y.shape)}, {tuple(residual.shape)} and a norm over "
            f"{tuple(norm.weight.shape)} do not fit"
        )
    thresh, dscale = threshold(p, training)
    if seed is None:
        seed = draw_seed() if thresh else 0
    return _DropoutAddNorm.apply(y, residual, norm.weight, norm.bias, float(norm.eps), thresh, dscale, seed)


class _LinearGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        h = torch.addmm(bias, x, weight.t())
        y, d = torch.empty_like(h), torch.empty_like(h)
        native.library().gelu_forward(h.data_ptr(), y.data_ptr(), d.data_ptr(), h.numel(), torch.get_num_threads())
        ctx.save_for_backward(x, weight, d)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, d = ctx.saved_tensors
        grad = grad.contiguous()
        dh, dbias = torch.empty_like(d), torch.empty_like(weight[:, 0])
        native.library().gelu_backward(
            grad.data_ptr(), d.data_ptr(), dh.data_ptr(), dbias.data_ptr(), *dh.shape, torch.get_num_threads()
        )
        dx = dh @ weight if ctx.needs_input_grad[0] else None
        return dx, dh.t() @ x if ctx.needs_input_grad[1] else None, dbias if ctx.needs_input_grad[2] else None


def linear_gelu(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """``gelu(linear(x))`` (erf GELU) over rows [tokens, in]: the forward saves GELU's derivative
    instead of its input, and the backward makes the bias gradient in the same pass as the
    input gradient, instead of a GELU-backward pass and a separate column sum."""
    _check(x, linear.weight, linear.bias)
    if x.dim() != 2 or linear.bias is None:
        raise ValueError(f"linear_gelu: rows [tokens, in] and a linear layer with a bias, got {tuple(x.shape)}")
    return _LinearGelu.apply(x.contiguous(), linear.weight, linear.bias)


@dataclass(frozen=True)
class Segments:
    """Where each sequence's queries and keys sit among the packed rows (int64 CPU tensors)."""

    kv_start: torch.Tensor
    kv_len: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor

    @staticmethod
    def of(lengths: torch.Tensor, queries: str = "all") -> Segments:
        """Sequences of ``lengths`` tokens packed back to back; queries: every token, or the first ("first")."""
        lengths = lengths.to(torch.int64).contiguous()
        start = torch.cumsum(lengths, 0) - lengths
        if queries == "all":
            return Segments(start, lengths, start, lengths)
        return Segments(start, lengths, torch.arange(len(lengths), dtype=torch.int64), torch.ones_like(lengths))

    def prob_offsets(self, heads: int) -> tuple[torch.Tensor, int]:
        sizes = heads * self.q_len * self.kv_len
        return torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, kv, cols, seg: Segments, heads: int, d: int, scale: float, thresh, dscale, seed):
        q_src = kv if queries is None else queries
        q_col, k_col, v_col = cols
        p_off, n_probs = seg.prob_offsets(heads)
        rows_q = int(seg.q_len.sum())
        out = kv.new_empty(rows_q, heads * d)
        probs = kv.new_empty(n_probs)
        keep = torch.empty(n_probs, dtype=torch.uint8) if thresh else None
        f = kv.element_size()
        args = (
            q_src.data_ptr() + q_col * f, q_src.stride(0), kv.data_ptr() + k_col * f, kv.data_ptr() + v_col * f,
            kv.stride(0), seg.kv_start.data_ptr(), seg.kv_len.data_ptr(), seg.q_start.data_ptr(),
            seg.q_len.data_ptr(), p_off.data_ptr(), len(seg.kv_len), heads, d, scale,
        )  # fmt: skip
        native.library().attn_forward(
            *args, out.data_ptr(), probs.data_ptr(), _ptr(keep), seed, thresh, dscale, torch.get_num_threads()
        )
        ctx.save_for_backward(queries, kv, probs, keep, p_off)
        ctx.meta = (cols, seg, heads, d, scale, dscale)
        return out

    @staticmethod
    def backward(ctx, grad):
        queries, kv, probs, keep, p_off = ctx.saved_tensors
        (q_col, k_col, v_col), seg, heads, d, scale, dscale = ctx.meta
        q_src = kv if queries is None else queries
        grad = grad.contiguous()
        dkv = torch.empty_like(kv)  # every column is written: q (self-attention), k, v
        dq = None if queries is None else torch.empty_like(queries)
        dq_src = dkv if dq is None else dq
        f = kv.element_size()
        native.library().attn_backward(
            q_src.data_ptr() + q_col * f, q_src.stride(0), kv.data_ptr() + k_col * f, kv.data_ptr() + v_col * f,
            kv.stride(0), seg.kv_start.data_ptr(), seg.kv_len.data_ptr(), seg.q_start.data_ptr(),
            seg.q_len.data_ptr(), p_off.data_ptr(), len(seg.kv_len), heads, d, scale, probs.data_ptr(),
            _ptr(keep), dscale, grad.data_ptr(), dq_src.data_ptr() + q_col * f, dkv.data_ptr() + k_col * f,
            dkv.data_ptr() + v_col * f, torch.get_num_threads(),
        )  # fmt: skip
        return dq, dkv, None, None, None, None, None, None, None, None


def attention(
    queries: torch.Tensor | None,
    kv: torch.Tensor,
    cols: tuple[int, int, int],
    seg: Segments,
    heads: int,
    d: int,
    scale: float,
    p: float,
    training: bool,
    seed: int | None = None,
) -> torch.Tensor:
    """Attention over packed rows: [query rows, heads * d].

    ``kv`` holds keys at column ``cols[1]`` and values at ``cols[2]`` (heads * d wide each); the
    queries are ``queries`` at column ``cols[0]``, or, when None, columns ``cols[0]`` of ``kv`` itself
    (one fused Q/K/V matrix, whose gradient then comes back as one tensor).
    """
    _check(queries, kv)
    if kv.stride(1) != 1 or (queries is not None and queries.stride(1) != 1):
        raise ValueError("attention: rows must be contiguous")
    if d % 8:
        raise ValueError(f"attention: the head size must be a multiple of 8 (AVX2 lanes), got {d}")
    if int(seg.kv_len.sum()) != kv.shape[0] or max(cols) + heads * d > kv.shape[1]:
        raise ValueError("attention: segments or columns do not match the packed rows")
    thresh, dscale = threshold(p, training)
    if seed is None:
        seed = draw_seed() if thresh else 0
    return _Attention.apply(queries, kv, cols, seg, heads, d, float(scale), thresh, dscale, seed)
