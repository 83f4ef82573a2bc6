"""The QA head on tiny encoder and decoder models: HF's loss, padding sides, save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch
from datasets import Dataset

from tuneval.config.benchmarks import ExtractiveQABenchmark
from tuneval.models import loading
from tuneval.problems import extractive_qa as qa
from tuneval.problems.base import Runtime


class FakeRun:
    """The few RunSpec fields build_model reads."""

    def __init__(self, path: Path):
        self.model_path = str(path)
        self.model = type("M", (), {"revision": None, "trust_remote_code": False})()


def features(tok, split: str = "test") -> Dataset:
    bench = ExtractiveQABenchmark(
        problem="extractive_qa", data={"files": {"train": "t", "test": "t"}}, max_length=32, doc_stride=8
    )
    rows = Dataset.from_list(tiny.qa_rows(6, 5, min_words=4, max_words=40))
    info = qa.check_data({split: rows}, bench, {split: "t"})
    return qa.prepare_split(rows, tok, bench, info, split), info


def batch_of(ds: Dataset, side: str, pad_id: int) -> dict[str, torch.Tensor]:
    from tuneval.data.batching import make_collate

    cols = [c for c in qa.TRAIN_COLUMNS if c in ds.column_names]
    rows = ds.select_columns(cols)
    return make_collate(pad_id, side)([rows[i] for i in range(len(rows))])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_loss_is_the_mean_of_start_and_end_cross_entropy_as_hf(model_dir: Path, name: str) -> None:
    tok = loading.load_tokenizer(str(model_dir / name))
    model = qa.build_model(FakeRun(model_dir / name), tok, {}).eval()
    ds, _ = features(tok, "train")
    same_len = ds.filter(lambda r: len(r["input_ids"]) == 32)  # no padding: HF's head sees the same logits
    assert len(same_len) >= 2
    batch = batch_of(same_len, "right", tok.pad_token_id)
    ours = qa.loss_fn(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or model.takes_token_types}
    theirs = model.hf(**inputs).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_decoder_left_padding_gives_the_same_loss_as_right(model_dir: Path) -> None:
    tok = loading.load_tokenizer(str(model_dir / "gpt2-left"))
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token  # the foundation's pad handling
    model = qa.build_model(FakeRun(model_dir / "gpt2-left"), tok, {}).eval()
    assert type(model.hf).__name__ == "GPT2ForQuestionAnswering"
    ds, _ = features(tok, "train")
    lengths = {len(x) for x in ds["input_ids"]}
    assert len(lengths) > 1  # the batch really is padded
    with torch.no_grad():
        left = qa.loss_fn(model, batch_of(ds, "left", tok.pad_token_id))
        right = qa.loss_fn(model, batch_of(ds, "right", tok.pad_token_id))
    assert left.item() == pytest.approx(right.item(), rel=1e-4)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_predict_after_save_and_load(model_dir: Path, tmp_path: Path, name: str) -> None:
    tok = loading.load_tokenizer(str(model_dir / name))
    model = qa.build_model(FakeRun(model_dir / name), tok, {})
    ds, info = features(tok)
    qa.save_model(model, tok, tmp_path / "m", info)
    loaded, tok2, info2 = qa.load_model(tmp_path / "m")
    assert info2 == info
    rt = Runtime(device=torch.device("cpu"), precision="fp32", batch_size=4)
    a = qa.predict(model, tok, ds, info, rt)
    b = qa.predict(loaded, tok2, ds, info2, rt)
    assert a["prediction_text"] == b["prediction_text"] and a["score"] == pytest.approx(b["score"], rel=1e-5)
    assert len(a["id"]) == 6 and set(a) >= {"id", "question", "prediction_text", "score", "gold_answers"}
    # Predicted spans are pieces of their own contexts.
    contexts = {r["id"]: r["context"] for r in tiny.qa_rows(6, 5, min_words=4, max_words=40)}
    assert all(t in contexts[i] for i, t in zip(a["id"], a["prediction_text"], strict=True))
    results, report = qa.score(a, ["exact_match", "f1"], info)
    assert 0 <= results["exact_match"] <= results["f1"] <= 100 and report["examples"] == 6


def test_head_only_training_freezes_the_backbone(model_dir: Path) -> None:
    from tuneval.training.optim import apply_trainable

    tok = loading.load_tokenizer(str(model_dir / "bert"))
    model = qa.build_model(FakeRun(model_dir / "bert"), tok, {})
    n = apply_trainable(model, "head")
    assert n == sum(p.numel() for p in model.hf.qa_outputs.parameters())
