"""Pooling and heads: first token for encoders, last real token for causal LMs, both paddings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tuneval.data.batching import make_collate
from tuneval.models import loading
from tuneval.problems import classification as clf


def test_pool_picks_first_and_last_real_token_under_both_paddings() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)  # value = position + 4*row
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert clf.pool(hidden, right, "last").squeeze(-1).tolist() == [2.0, 5.0]
    assert clf.pool(hidden, left, "last").squeeze(-1).tolist() == [3.0, 7.0]
    assert clf.pool(hidden, right, "first").squeeze(-1).tolist() == [0.0, 4.0]
    assert clf.pool(hidden, left, "first").squeeze(-1).tolist() == [1.0, 6.0]


def test_auto_pooling_by_architecture(model_dir: Path) -> None:
    bert_cfg = loading.load_config(str(model_dir / "bert"))
    gpt_cfg = loading.load_config(str(model_dir / "gpt2"))
    assert clf.resolve_pooling("auto", bert_cfg) == "first"
    assert clf.resolve_pooling("auto", gpt_cfg) == "last"
    assert clf.resolve_pooling("first", gpt_cfg) == "first"


def _classifier(path: Path, num_labels: int = 3) -> tuple[clf.Classifier, object]:
    tok = loading.load_tokenizer(str(path))
    spec = SimpleNamespace(revision=None, trust_remote_code=False, pooling="auto")
    torch.manual_seed(0)
    return clf.new_classifier(str(path), spec, tok, num_labels, dropout=0.1).eval(), tok


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_head_output_shape(model_dir: Path, name: str) -> None:
    model, tok = _classifier(model_dir / name, num_labels=3)
    enc = tok(["the movie", "a great fun film the plot"], padding=True, return_tensors="pt")
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert logits.shape == (2, 3)
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.1


def test_causal_lm_without_pad_token_gets_one(model_dir: Path) -> None:
    tok = loading.load_tokenizer(str(model_dir / "gpt2"))
    assert tok.pad_token is not None and tok.pad_token == tok.eos_token


def test_causal_lm_logits_do_not_depend_on_padding_side(model_dir: Path) -> None:
    model, tok = _classifier(model_dir / "gpt2")
    rows = [
        {"input_ids": tok(t)["input_ids"], "attention_mask": [1] * len(tok(t)["input_ids"])}
        for t in ["the movie", "a great fun film with the best plot"]
    ]
    alone = [
        model(input_ids=torch.tensor([r["input_ids"]]), attention_mask=torch.tensor([r["attention_mask"]]))
        for r in rows
    ]
    for side in ("left", "right"):
        batch = make_collate(tok.pad_token_id, side)(rows)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for i, single in enumerate(alone):
            torch.testing.assert_close(logits[i], single[0], atol=1e-5, rtol=1e-4)


def test_encoder_first_token_is_cls(model_dir: Path) -> None:
    tok = loading.load_tokenizer(str(model_dir / "bert"))
    ids = tok("the movie", "the plot")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2


def test_save_and_load_roundtrip(model_dir: Path, tmp_path: Path) -> None:
    model, tok = _classifier(model_dir / "bert", num_labels=2)
    clf.save_model(model, tok, tmp_path / "m", {"label_names": ["neg", "pos"]})
    again, _, info = clf.load_model(tmp_path / "m")
    enc = tok(["a great film"], return_tensors="pt")
    torch.testing.assert_close(model(**enc), again.eval()(**enc))
    assert info["label_names"] == ["neg", "pos"] and again.pooling == "first"


def test_trainable_head_only_and_top_k(model_dir: Path) -> None:
    from tuneval.config.train import TopK
    from tuneval.training.optim import apply_trainable

    model, _ = _classifier(model_dir / "bert")
    head = apply_trainable(model, "head")
    assert head == sum(p.numel() for p in model.classifier.parameters())
    model, _ = _classifier(model_dir / "bert")
    top1 = apply_trainable(model, TopK(top_k=1))
    layer = loading.layer_stack(model.backbone)[-1]
    assert top1 == head + sum(p.numel() for p in layer.parameters())
    assert not any(p.requires_grad for p in loading.layer_stack(model.backbone)[0].parameters())
