"""tuneval's BERT encoder forward (packed_bert) computes what transformers' BertModel computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import _model, _toy_dataset
from transformers import BertConfig, BertModel

from tuneval import hash_dropout, packed_bert
from tuneval.config.schema import TrainSettings
from tuneval.problems import classification as clf
from tuneval.training import train


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
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("with_types", [True, False])
def test_first_token_states_equal_bertmodel(padding: str, pack: bool, with_types: bool) -> None:
    bert = _bert().eval()
    ids, mask, types = _inputs(padding)
    types = types if with_types else None
    with torch.no_grad():
        want = _reference(bert, ids, mask, types)
        got = packed_bert.first_token_states(bert, ids, mask, types, pack=pack)
    assert got.shape == want.shape == (5, 48)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("pack", "heads", "padding"),
    [
        (True, 4, "right"),  # head size 12: torch ops on packed rows
        (False, 4, "right"),  # the padded layout (CUDA's)
        (True, 3, "right"),  # head size 16: the fused CPU kernels, where they build
        (True, 3, "left"),
    ],
)
def test_gradients_equal_bertmodel(pack: bool, heads: int, padding: str) -> None:
    # Training mode with dropout 0: every parameter's gradient, including the concatenated Q/K/V
    # weights' and the last layer's (computed for [CLS] only), matches transformers'.
    bert = _bert(heads=heads).train()
    ids, mask, types = _inputs(padding)
    target = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))

    def grads(f) -> dict[str, torch.Tensor]:
        bert.zero_grad(set_to_none=True)
        (f() * target).sum().backward()
        return {n: p.grad.clone() for n, p in bert.named_parameters() if p.grad is not None}

    want = grads(lambda: _reference(bert, ids, mask, types))
    got = grads(lambda: packed_bert.first_token_states(bert, ids, mask, types, pack=pack))
    with torch.no_grad():
        torch.testing.assert_close(
            packed_bert.first_token_states(bert, ids, mask, types, pack=pack), _reference(bert, ids, mask, types)
        )
    assert set(got) == set(want) and len(got) > 30  # the pooler gets no gradient in either
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_cpu_dropout_keeps_one_minus_p_scaled_and_is_seeded() -> None:
    x = torch.ones(2_000, 500)
    torch.manual_seed(3)
    a = packed_bert.dropout(x, 0.1, True)
    torch.manual_seed(3)
    b = packed_bert.dropout(x, 0.1, True)
    c = packed_bert.dropout(x, 0.1, True)
    assert torch.equal(a, b) and not torch.equal(b, c)  # the global generator drives the masks
    kept = (a > 0).float().mean().item()
    # p is rounded to a multiple of 1/65536; 1e6 draws: the standard error is 3e-4.
    assert abs(kept - (1 - round(0.1 * 65536) / 65536)) < 1.5e-3
    assert abs(a.mean().item() - 1.0) < 2e-3  # scaled so the expectation is kept
    assert packed_bert.dropout(x, 0.1, False) is x and packed_bert.dropout(x, 0.0, True) is x
    # No lane of the 64-bit draw is biased: each of the four 16-bit slices keeps 1 - p.
    lanes = (a.reshape(-1, 4) > 0).float().mean(dim=0)
    assert (lanes - kept).abs().max().item() < 4e-3


def test_cpu_dropout_gradient_is_the_mask() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    y = packed_bert.dropout(x, 0.25, True)
    y.sum().backward()
    scale = 1 / (1 - round(0.25 * 65536) / 65536)
    torch.testing.assert_close(x.grad, (y != 0).float() * scale)


def test_supports_only_what_it_reproduces() -> None:
    bert = _bert(dropout=0.1)
    assert packed_bert.supports(bert, "first")
    assert not packed_bert.supports(bert, "last")
    hash_dropout.install(bert, 0)  # fused seeds draw hashed masks through transformers' forward
    assert not packed_bert.supports(bert, "first")
    hash_dropout.uninstall(bert)
    assert packed_bert.supports(bert, "first")
    decoder = BertModel(
        BertConfig(vocab_size=90, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, is_decoder=True)
    )
    assert not packed_bert.supports(decoder, "first")


def test_classifier_logits_equal_with_either_forward(model_dir: Path) -> None:
    model = _model(model_dir).eval()
    ds, tok = _toy_dataset(model_dir)
    from tuneval.batching import make_collate

    batch = make_collate(tok.pad_token_id, "right")([ds[i] for i in range(8)])
    model.own_kernels = False
    with torch.no_grad():
        want = clf.forward_logits(model, batch)
        model.own_kernels = True
        got = clf.forward_logits(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_with_own_kernels_follows_transformers_forward(model_dir: Path) -> None:
    # The whole loop, dropout off: tuneval's encoder forward and transformers' give the same loss
    # curve and weights (with dropout on they are two samples of the recipe: other masks).
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(epochs=2, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_every_steps=1)
    runs = []
    for own in (False, True):
        model = _model(model_dir)
        model.own_kernels = own
        result = train(model, ds, s, 4, clf.loss_fn, None, tok.pad_token_id, "right", torch.device("cpu"), None, False)
        runs.append((model, [h["loss"] for h in result.history]))
    (hf, hf_losses), (own, own_losses) = runs
    assert len(own_losses) == len(hf_losses) >= 8
    torch.testing.assert_close(own_losses, hf_losses, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(hf.named_parameters(), own.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=2e-5, rtol=1e-4, msg=name)


def test_word_embedding_gradient_buffer_equals_a_fresh_dense_gradient() -> None:
    # Successive steps (set_to_none between), an accumulated step and a pad id in the batch: the
    # reused buffer always holds what nn.Embedding's own backward gives.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, padding_idx=0)
    ref = torch.nn.Embedding(50, 8, padding_idx=0)
    ref.load_state_dict(emb.state_dict())
    g = torch.Generator().manual_seed(1)
    steps = [[torch.randint(0, 50, (30,), generator=g)] for _ in range(3)]
    steps.append([torch.randint(0, 50, (30,), generator=g) for _ in range(2)])  # accumulation
    steps.append([torch.tensor([0, 0, 7, 7, 7])])
    for batches in steps:
        emb.weight.grad = ref.weight.grad = None
        for ids in batches:
            w = torch.randn(len(ids), 8, generator=g)
            (packed_bert._word_embeddings(emb, ids) * w).sum().backward()
            (ref(ids) * w).sum().backward()
        torch.testing.assert_close(emb.weight.grad, ref.weight.grad, atol=1e-6, rtol=1e-6)
        # Clipping reads only the written rows: every row outside them must be zero.
        rows = packed_bert.written_rows(emb.weight.grad)
        outside = torch.ones(50, dtype=torch.bool)
        outside[rows] = False
        assert rows is not None and not emb.weight.grad[outside].any()
        emb.weight.grad.mul_(0.5)  # clipping scales in place: zero rows stay zero
    buffer = emb.__dict__["_tuneval_grad_buffer"]
    assert emb.weight.grad is buffer.tensor  # reused, not reallocated
    hooked = torch.nn.Embedding(50, 8)
    hooked.weight.register_post_accumulate_grad_hook(lambda p: None)
    packed_bert._word_embeddings(hooked, torch.tensor([1, 2])).sum().backward()
    assert "_tuneval_grad_buffer" not in hooked.__dict__  # hooks must see AccumulateGrad: plain path
    assert packed_bert.written_rows(hooked.weight.grad) is None  # unknown: clipping reads it all


def test_word_embedding_gradient_buffer_recovers_from_a_nan_clip() -> None:
    # Clipping after a NaN multiplies every gradient by NaN, the untouched rows too: the next step
    # must start from zeros again, not from the rows the last step wrote.
    emb = torch.nn.Embedding(20, 4, padding_idx=0)
    packed_bert._word_embeddings(emb, torch.tensor([3, 4])).sum().backward()
    emb.weight.grad.mul_(float("nan"))
    emb.weight.grad = None
    packed_bert._word_embeddings(emb, torch.tensor([5])).sum().backward()
    want = torch.zeros(20, 4)
    want[5] = 1.0
    torch.testing.assert_close(emb.weight.grad, want)
