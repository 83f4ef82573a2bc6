"""row_adamw: AdamW on a parameter whose gradient is zero outside a few rows, against torch's fused AdamW."""

from __future__ import annotations

import pytest
import torch

from tuneval import native, row_adamw

pytestmark = pytest.mark.skipif(native.library() is None, reason="needs the native CPU kernels")


Pair = tuple[torch.Tensor, torch.optim.AdamW, torch.Tensor, torch.optim.AdamW]


def _pair(shape: tuple[int, int], **kw: object) -> Pair:
    torch.manual_seed(0)
    p = torch.randn(shape)
    ref = p.clone()
    return p, torch.optim.AdamW([p], fused=True, **kw), ref, torch.optim.AdamW([ref], fused=True, **kw)


def _grad(shape: tuple[int, int], written: torch.Tensor) -> torch.Tensor:
    g = torch.zeros(shape)
    g.index_add_(0, written, torch.randn(len(written), shape[1]))  # repeated rows add, as in an embedding
    return g


def _torch_step(opt: torch.optim.AdamW, scale: torch.Tensor | None) -> None:
    if scale is not None:
        opt.grad_scale = scale
    opt.step()
    if scale is not None:
        del opt.grad_scale


@pytest.mark.parametrize(
    ("shape", "settings", "scale"),
    [
        ((60, 32), dict(lr=1e-2, weight_decay=0.01), None),  # the recipe's AdamW
        ((60, 32), dict(lr=3e-3, weight_decay=0.0, eps=1e-3), 2.5),  # clipping's grad_scale; no decay
        ((60, 20), dict(lr=1e-2, weight_decay=0.1), None),  # a width that is not a multiple of 8
        ((60, 32), dict(lr=1e-2, weight_decay=0.01, betas=(0.3, 0.99)), 1.7),  # torch's other lerp form
    ],
)
def test_row_step_equals_torch_fused_adamw(shape: tuple[int, int], settings: dict, scale: float | None) -> None:
    p, opt, ref, ref_opt = _pair(shape, **settings)
    gs = None if scale is None else torch.tensor(scale)
    never = p[45:].clone()
    for step in range(6):
        written = torch.randint(0, 10 + 6 * step, (12,))  # rows join over time; rows past 40 never do
        p.grad = _grad(shape, written)
        ref.grad = p.grad.clone()
        row_adamw.step(opt, opt.param_groups[0], p, written, gs)
        _torch_step(ref_opt, gs)
        torch.testing.assert_close(p, ref, atol=1e-7, rtol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[ref][key], atol=1e-9, rtol=1e-6)
    # Rows never written only decayed (and stayed put without weight decay).
    assert torch.equal(p[45:] != never, torch.full_like(never, settings["weight_decay"] > 0, dtype=torch.bool))


def test_rows_with_momentum_are_never_skipped_after_torch_steps_or_a_reload() -> None:
    # Rows stepped outside row_adamw (torch's own step, or a loaded checkpoint) carry momentum
    # that the row mask has not seen: they must still get the full update, not the decay alone.
    shape = (40, 16)
    p, opt, ref, ref_opt = _pair(shape, lr=1e-2, weight_decay=0.01)
    plan = [("rows", [0, 1]), ("torch", [2, 3]), ("rows", [5]), ("reload", [7]), ("rows", [9])]
    for kind, rows in plan:
        written = torch.tensor(rows)
        p.grad = _grad(shape, written)
        ref.grad = p.grad.clone()
        if kind == "torch":
            opt.step()
        else:
            if kind == "reload":
                state = opt.state_dict()
                opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, fused=True)
                opt.load_state_dict(state)
            row_adamw.step(opt, opt.param_groups[0], p, written, None)
        ref_opt.step()
        torch.testing.assert_close(p, ref, atol=1e-7, rtol=1e-6, msg=f"after {kind} {rows}")


def test_usable_only_for_plain_fused_float32_adamw() -> None:
    p = torch.zeros(4, 8)
    p.grad = torch.zeros(4, 8)
    fused = torch.optim.AdamW([p], fused=True)
    assert row_adamw.usable(fused, fused.param_groups[0], p)
    for opt in (torch.optim.AdamW([p], fused=True, amsgrad=True), torch.optim.AdamW([p], foreach=False)):
        assert not row_adamw.usable(opt, opt.param_groups[0], p)
    q = torch.zeros(4, 8, dtype=torch.float64)
    q.grad = torch.zeros_like(q)
    opt = torch.optim.AdamW([q], fused=True)
    assert not row_adamw.usable(opt, opt.param_groups[0], q)


def test_the_gradient_is_left_as_it_is_even_under_a_nan_grad_scale() -> None:
    # The reused embedding gradient must stay zero outside the rows it wrote: a NaN clip factor (a
    # NaN norm) may spoil the weights, but must not write 0 / NaN into rows no later step clears.
    shape = (20, 16)
    p, opt, _, _ = _pair(shape, lr=1e-2)
    p.grad = _grad(shape, torch.tensor([0, 1, 2, 3]))
    row_adamw.step(opt, opt.param_groups[0], p, torch.tensor([0, 1, 2, 3]), torch.tensor(2.0))  # rows 0-3 active
    p.grad = _grad(shape, torch.tensor([1]))
    before = p.grad.clone()
    row_adamw.step(opt, opt.param_groups[0], p, torch.tensor([1]), torch.tensor(float("nan")))
    assert torch.equal(p.grad, before)
    assert torch.isnan(p[:4]).all() and not torch.isnan(p[4:]).any()  # active rows took the NaN step
