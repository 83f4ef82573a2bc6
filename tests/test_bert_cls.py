"""tuneval's BERT [CLS] forward (accel.bert_cls) computes what transformers' BertModel computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import _model, _toy_dataset
from transformers import BertConfig, BertModel

from tuneval import accel
from tuneval.accel import bert_cls
from tuneval.config.train import TrainSettings
from tuneval.problems import classification as clf
from tuneval.training import hash_dropout
from tuneval.training.loop import train


def _bert(dropout: float = 0.0, heads: int = 4) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=90,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=heads,
        intermediate_size=96,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertModel(cfg)


def _inputs(padding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 90, (5, 11), generator=g)
    mask = torch.ones(5, 11, dtype=torch.long)
    lengths = [11, 7, 3, 9, 1]
    for row, n in enumerate(lengths):
        if padding == "right":
            mask[row, n:] = 0
        elif padding == "left":
            mask[row, : 11 - n] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, torch.randint(0, 2, (5, 11), generator=g)


def _reference(bert: BertModel, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
    hidden = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    return clf.pool(hidden, mask, "first")


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("cls_only", [True, False])
@pytest.mark.parametrize("with_types", [True, False])
def test_first_token_states_equal_bertmodel(padding: str, cls_only: bool, with_types: bool) -> None:
    bert = _bert().eval()
    ids, mask, types = _inputs(padding)
    types = types if with_types else None
    with torch.no_grad():
        want = _reference(bert, ids, mask, types)
        got = bert_cls.first_token_states(bert, ids, mask, types, bert_cls.Options(cls_only=cls_only))
    assert got.shape == want.shape == (5, 48)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "heads", "padding"),
    [
        (bert_cls.Options(), 4, "right"),  # head size 12
        (bert_cls.Options(cls_only=False), 4, "right"),  # every token in the last layer
        (bert_cls.Options(), 3, "right"),  # head size 16
        (bert_cls.Options(), 3, "left"),
        # benchmarks/step_ab.py times each saving alone: each variant must still be the same function.
        (bert_cls.Options(cheap_dropout=False), 4, "right"),
        (bert_cls.Options(cls_only=False, cheap_dropout=False), 4, "left"),
    ],
    ids=["cls-only", "all-layers", "head-16", "left-padding", "torch-dropout", "all-layers-torch-dropout-left"],
)
def test_gradients_equal_bertmodel(options: bert_cls.Options, heads: int, padding: str) -> None:
    # Training mode with dropout 0: every parameter's gradient, including the last layer's
    # (computed for [CLS] only), matches transformers'.
    bert = _bert(heads=heads).train()
    ids, mask, types = _inputs(padding)
    target = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))

    def grads(f) -> dict[str, torch.Tensor]:
        bert.zero_grad(set_to_none=True)
        (f() * target).sum().backward()
        return {n: p.grad.clone() for n, p in bert.named_parameters() if p.grad is not None}

    want = grads(lambda: _reference(bert, ids, mask, types))
    got = grads(lambda: bert_cls.first_token_states(bert, ids, mask, types, options))
    with torch.no_grad():
        torch.testing.assert_close(
            bert_cls.first_token_states(bert, ids, mask, types, options), _reference(bert, ids, mask, types)
        )
    assert set(got) == set(want) and len(got) > 30  # the pooler gets no gradient in either
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_cpu_dropout_keeps_one_minus_p_scaled_and_is_seeded() -> None:
    x = torch.ones(2_000, 500)
    torch.manual_seed(3)
    a = bert_cls.dropout(x, 0.1, True)
    torch.manual_seed(3)
    b = bert_cls.dropout(x, 0.1, True)
    c = bert_cls.dropout(x, 0.1, True)
    assert torch.equal(a, b) and not torch.equal(b, c)  # the global generator drives the masks
    kept = (a > 0).float().mean().item()
    # p is rounded to a multiple of 1/65536; 1e6 draws: the standard error is 3e-4.
    assert abs(kept - (1 - round(0.1 * 65536) / 65536)) < 1.5e-3
    assert abs(a.mean().item() - 1.0) < 2e-3  # scaled so the expectation is kept
    assert bert_cls.dropout(x, 0.1, False) is x and bert_cls.dropout(x, 0.0, True) is x
    # No lane of the 64-bit draw is biased: each of the four 16-bit slices keeps 1 - p.
    lanes = (a.reshape(-1, 4) > 0).float().mean(dim=0)
    assert (lanes - kept).abs().max().item() < 4e-3


def test_cpu_dropout_gradient_is_the_mask() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    y = bert_cls.dropout(x, 0.25, True)
    y.sum().backward()
    scale = 1 / (1 - round(0.25 * 65536) / 65536)
    torch.testing.assert_close(x.grad, (y != 0).float() * scale)


def test_supports_only_what_it_reproduces() -> None:
    bert = _bert(dropout=0.1)
    assert bert_cls.supports(bert, "first")
    assert not bert_cls.supports(bert, "last")
    hash_dropout.install(bert, 0)  # fused seeds draw hashed masks through transformers' forward
    assert not bert_cls.supports(bert, "first")
    hash_dropout.uninstall(bert)
    assert bert_cls.supports(bert, "first")
    decoder = BertModel(
        BertConfig(vocab_size=90, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, is_decoder=True)
    )
    assert not bert_cls.supports(decoder, "first")


def test_classifier_logits_equal_with_either_forward(model_dir: Path) -> None:
    model = _model(model_dir).eval()
    ds, tok = _toy_dataset(model_dir)
    from tuneval.data.batching import make_collate

    batch = make_collate(tok.pad_token_id, "right")([ds[i] for i in range(8)])
    accel.apply(model, accel.MAINSTREAM)
    with torch.no_grad():
        want = clf.forward_logits(model, batch)
        accel.apply(model, accel.Levers(encoder_forward=True))
        assert model.encoder_forward is not None
        got = clf.forward_logits(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_with_own_kernels_follows_transformers_forward(model_dir: Path) -> None:
    # The whole loop, dropout off: tuneval's encoder forward and transformers' give the same loss
    # curve and weights (with dropout on they are two samples of the recipe: other masks).
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(epochs=2, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_every_steps=1)
    runs = []
    for own in (False, True):
        model = accel.apply(_model(model_dir), accel.Levers(encoder_forward=own))
        assert (model.encoder_forward is not None) == own
        result = train(model, ds, s, 4, clf.loss_fn, None, tok.pad_token_id, "right", torch.device("cpu"), None, False)
        runs.append((model, [h["loss"] for h in result.history]))
    (hf, hf_losses), (own, own_losses) = runs
    assert len(own_losses) == len(hf_losses) >= 8
    torch.testing.assert_close(own_losses, hf_losses, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(hf.named_parameters(), own.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=2e-5, rtol=1e-4, msg=name)
