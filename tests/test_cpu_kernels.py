"""The fused CPU kernels (src/tuneval/native/cpu_fused.c) against the torch ops they replace."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tuneval import cpu_kernels as ck
from tuneval import native

BUILDABLE = (
    sys.platform == "linux"
    and platform.machine() == "x86_64"
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and shutil.which(os.environ.get("CC") or "cc") is not None
)
pytestmark = pytest.mark.skipif(not BUILDABLE, reason="needs x86-64 Linux with AVX2 and a C compiler")


def test_the_kernels_build_and_load_here() -> None:
    # Where they can be built they must be: otherwise every CPU run silently takes the slow path.
    assert native.library() is not None
    assert ck.available(torch.zeros(1))
    assert not ck.available(torch.zeros(1, dtype=torch.float64))


def test_build_is_cached_by_source_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEVAL_NATIVE_CACHE", str(tmp_path))
    first = native.build()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    with pytest.raises(OSError, match="no C compiler"):
        native.build(compiler="no-such-cc-here")


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEVAL_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert not ck.available(torch.zeros(1))
    finally:
        native.library.cache_clear()


def _keep(seed: int, start: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    thresh, scale = ck.threshold(p, True)
    n = 1
    for s in shape:
        n *= s
    if not thresh:
        return torch.ones(shape)
    return ck.keep_reference(seed, start, n, thresh).view(shape).float() * scale


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("training", [True, False])
def test_dropout_add_norm_matches_torch(p: float, training: bool) -> None:
    torch.manual_seed(0)
    rows, hidden, seed = 45, 40, 0x1234_5678_9ABC
    y = torch.randn(rows, hidden, requires_grad=True)
    r = torch.randn(rows, hidden, requires_grad=True)
    norm = torch.nn.LayerNorm(hidden, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    got = ck.dropout_add_norm(y, r, norm, p, training, seed=seed)
    keep = _keep(seed, 0, (rows, hidden), p) if training else torch.ones(rows, hidden)
    want = norm(y * keep + r)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn(rows, hidden)
    params = (y, r, norm.weight, norm.bias)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_masks_keep_one_minus_p_are_seeded_and_fresh_per_call() -> None:
    x = torch.ones(1000, 1000)
    norm = torch.nn.LayerNorm(1000, elementwise_affine=True)
    torch.manual_seed(3)
    a = ck.dropout_add_norm(x, torch.zeros_like(x), norm, 0.25, True)
    b = ck.dropout_add_norm(x, torch.zeros_like(x), norm, 0.25, True)
    torch.manual_seed(3)
    a2 = ck.dropout_add_norm(x, torch.zeros_like(x), norm, 0.25, True)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)  # the seed comes from torch's generator
    assert not torch.equal(a, b)  # each call draws a new mask
    # Dropped entries are the row minimum after LayerNorm (x was all ones): count them.
    dropped = (a == a.min(dim=1, keepdim=True).values).float().mean().item()
    assert abs(dropped - 0.25) < 0.005  # 1e6 draws: 5 standard deviations is 0.0022
    # Neighbouring elements are not correlated (a weak hash would show it here).
    kept = (a != a.min(dim=1, keepdim=True).values).float().view(-1)
    corr = torch.corrcoef(torch.stack([kept[:-1], kept[1:]]))[0, 1].item()
    assert abs(corr) < 0.01


def _reference_attention(q_rows, kv, cols, lengths, heads, d, scale, keep):
    """Padded-free torch attention, one sequence and head at a time, with the kernels' masks."""
    outs, start, off = [], 0, 0
    for b, n in enumerate(lengths):
        rows = kv[start : start + n]
        q = rows[:, cols[0] : cols[0] + heads * d] if q_rows is None else q_rows[b : b + 1]
        k = rows[:, cols[1] : cols[1] + heads * d].view(n, heads, d).transpose(0, 1)
        v = rows[:, cols[2] : cols[2] + heads * d].view(n, heads, d).transpose(0, 1)
        lq = q.shape[0]
        qh = q.reshape(lq, heads, d).transpose(0, 1)
        probs = torch.softmax(qh @ k.transpose(1, 2) * scale, dim=-1)
        size = heads * lq * n
        o = (probs * keep[off : off + size].view(heads, lq, n)) @ v
        outs.append(o.transpose(0, 1).reshape(lq, heads * d))
        start, off = start + n, off + size
    return torch.cat(outs)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("d", [32, 64, 16])  # 32 and 64 have their own compiled code; 16 the generic loop
@pytest.mark.parametrize("queries", ["all", "first"])
def test_packed_attention_matches_torch(p: float, d: int, queries: str) -> None:
    torch.manual_seed(1)
    heads, lengths, seed = 3, [5, 1, 8, 2, 33], 987_654_321_987
    width = heads * d
    total = sum(lengths)
    seg = ck.Segments.of(torch.tensor(lengths), queries)
    if queries == "all":  # one fused Q/K/V matrix, as a layer computes it
        kv = torch.randn(total, 3 * width, requires_grad=True)
        q_rows, cols, inputs = None, (0, width, 2 * width), (kv,)
    else:  # the last layer: a query for each sequence's first token, keys and values for all
        kv = torch.randn(total, 2 * width, requires_grad=True)
        q_rows = torch.randn(len(lengths), width, requires_grad=True)
        cols, inputs = (0, 0, width), (q_rows, kv)
    scale = d**-0.5
    got = ck.attention(q_rows, kv, cols, seg, heads, d, scale, p, True, seed=seed)
    n_probs = seg.prob_offsets(heads)[1]
    keep = _keep(seed, 0, (n_probs,), p)
    want = _reference_attention(q_rows, kv, cols, lengths, heads, d, scale, keep)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_rejects_mismatched_segments() -> None:
    kv = torch.randn(10, 3 * 32)
    with pytest.raises(ValueError, match="segments"):
        ck.attention(None, kv, (0, 32, 64), ck.Segments.of(torch.tensor([4, 5])), 1, 32, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="multiple of 8"):
        ck.attention(None, kv, (0, 36, 72), ck.Segments.of(torch.tensor([10])), 3, 12, 1.0, 0.0, False)


def test_other_dtypes_are_refused_not_read_as_float32() -> None:
    norm = torch.nn.LayerNorm(8)
    half = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        ck.dropout_add_norm(half, torch.randn(4, 8), norm, 0.0, False)
    with pytest.raises(TypeError, match="float32"):
        ck.attention(None, half.repeat(1, 3), (0, 8, 16), ck.Segments.of(torch.tensor([4])), 1, 8, 1.0, 0.0, False)
    with pytest.raises(TypeError, match="float32"):
        ck.linear_gelu(half, torch.nn.Linear(8, 8))


def test_attention_agrees_with_sdpa_without_dropout() -> None:
    # An independent reference: torch's own scaled_dot_product_attention on the padded batch.
    torch.manual_seed(2)
    heads, d, lengths = 4, 32, [7, 3, 12]
    b, length, width = len(lengths), max(lengths), heads * d
    qkv = torch.randn(sum(lengths), 3 * width)
    got = ck.attention(
        None, qkv, (0, width, 2 * width), ck.Segments.of(torch.tensor(lengths)), heads, d, 0.2, 0.0, False
    )
    padded = torch.zeros(b, length, 3 * width)
    mask = torch.zeros(b, length, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lengths):
        padded[i, :n], mask[i, :n] = qkv[start : start + n], True
        start += n
    q, k, v = (padded[..., j * width : (j + 1) * width].view(b, length, heads, d).transpose(1, 2) for j in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=0.2)
    ref = ref.transpose(1, 2).reshape(b, length, width)[mask]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("rows", "width", "spread"),
    [
        (37, 48, 1.0),  # rows that do not split evenly over threads
        (5, 13, 4.0),  # a width that is not a multiple of 8: the tail lanes; large |x|, erf's tails
        (64, 1536, 3.0),  # MiniLM's FFN width
    ],
)
def test_linear_gelu_matches_linear_then_gelu(rows: int, width: int, spread: float) -> None:
    torch.manual_seed(3)
    lin = torch.nn.Linear(24, width)
    with torch.no_grad():
        lin.weight.mul_(spread)
        lin.bias.normal_(0.0, spread)
    x = torch.randn(rows, 24, requires_grad=True)
    got = ck.linear_gelu(x, lin)
    ref_lin = torch.nn.Linear(24, width)
    ref_lin.load_state_dict(lin.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    want = F.gelu(ref_lin(x_ref))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g = torch.randn(rows, width)
    got_grads = torch.autograd.grad(got, (x, lin.weight, lin.bias), g)
    want_grads = torch.autograd.grad(want, (x_ref, ref_lin.weight, ref_lin.bias), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gelu_kernel_over_the_whole_range() -> None:
    # Every regime of the erf approximation and of exp's clamp: deep negative (0), around 0, large.
    h = torch.linspace(-30.0, 30.0, 20_001)
    y, d = torch.empty_like(h), torch.empty_like(h)
    native.library().gelu_forward(h.data_ptr(), y.data_ptr(), d.data_ptr(), h.numel(), 2)
    hr = h.detach().clone().requires_grad_(True)
    want = F.gelu(hr)
    (want_d,) = torch.autograd.grad(want.sum(), hr)
    torch.testing.assert_close(y, want.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d, want_d, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "sizes",
    [
        [1],
        [7, 4096, 4097, 13],  # chunk edges and lanes' tails
        [384] * 40 + [1536 * 384, 30_000],  # many small tensors beside large ones
    ],
)
def test_sum_of_squares_matches_torch(sizes: list[int]) -> None:
    torch.manual_seed(4)
    tensors = [torch.randn(n) * (i + 1) for i, n in enumerate(sizes)]
    want = sum(float(t.double().pow(2).sum()) for t in tensors)
    assert ck.sum_of_squares(tensors) == pytest.approx(want, rel=1e-6)
    assert ck.sum_of_squares([tensors[0].view(1, -1).t()]) == pytest.approx(float(tensors[0].double().pow(2).sum()))
