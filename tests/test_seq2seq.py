"""Seq2seq: label masking, layouts per architecture, loss, generation, bad input (tiny models)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny
import torch
from datasets import Dataset

from tuneval.config.benchmarks import Seq2SeqBenchmark
from tuneval.data.batching import PAD_LABEL, make_collate
from tuneval.errors import DataError
from tuneval.inference import decoding
from tuneval.models import loading
from tuneval.problems import seq2seq, seq2seq_models
from tuneval.problems import seq2seq_format as fmt
from tuneval.problems.base import Runtime

RT = Runtime(torch.device("cpu"), "fp32", 8)


def bench(**kw) -> Seq2SeqBenchmark:
    spec = {
        "problem": "seq2seq",
        "data": {"files": {"train": "t.jsonl", "test": "x.jsonl"}},
        "columns": {"source": "document", "target": "summary", "id": "id"},
        "max_source_length": 24,
        "max_target_length": 8,
        "generation": {"max_new_tokens": 6},
    }
    return Seq2SeqBenchmark.model_validate({**spec, **kw})


def run_for(path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        model_path=str(path),
        model=SimpleNamespace(revision=None, trust_remote_code=False),
        benchmark_name="toy",
        train=SimpleNamespace(trainable="all"),
    )


def prepared(model_dir: Path, name: str, b: Seq2SeqBenchmark | None = None, n: int = 12):
    b = b or bench()
    ds = Dataset.from_list(tiny.summary_rows(n, 7))
    info = seq2seq.check_data({"test": ds}, b, {"test": "x.jsonl"})
    tok = loading.load_tokenizer(str(model_dir / name))
    return seq2seq.prepare_split(ds, tok, b, info, "test"), info


# ---------------------------------------------------------------- labels (pure)


def test_causal_example_masks_prompt_and_ends_with_eos() -> None:
    row = fmt.causal_example([5, 6, 7], [8, 9, 10, 11], eos_id=0, max_target_tokens=3)
    assert row["input_ids"] == [5, 6, 7, 8, 9, 0]  # target cut to 2 tokens + eos
    assert row["labels"] == [PAD_LABEL] * 3 + [8, 9, 0]
    assert row["prompt_length"] == 3 and fmt.target_token_count(row["labels"]) == 3


def test_encdec_labels_drop_only_a_leading_decoder_start() -> None:
    assert fmt.encdec_labels([2, 40, 41, 3], decoder_start_id=2) == [40, 41, 3]  # BERT2BERT: [CLS] dropped
    assert fmt.encdec_labels([0, 40, 2], decoder_start_id=2) == [0, 40, 2]  # BART keeps <s>
    assert fmt.encdec_labels([40, 1], decoder_start_id=None) == [40, 1]


def test_collate_pads_labels_with_ignore_index() -> None:
    rows = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [PAD_LABEL, 3, 4]},
        {"input_ids": [1], "attention_mask": [1], "labels": [9]},
    ]
    batch = make_collate(pad_id=0)(rows)
    assert batch["labels"].tolist() == [[PAD_LABEL, 3, 4], [9, PAD_LABEL, PAD_LABEL]]
    assert batch["input_ids"].tolist()[1] == [1, 0, 0]
    # Encoder-decoder targets can be longer than their sources: each field gets its own width.
    batch = make_collate(pad_id=0)([{"input_ids": [5], "attention_mask": [1], "labels": [7, 8, 9]}, rows[1]])
    assert batch["input_ids"].tolist() == [[5], [1]]
    assert batch["labels"].tolist() == [[7, 8, 9], [9, PAD_LABEL, PAD_LABEL]]


def test_dotted_columns_read_the_wmt_layout() -> None:
    row = {"translation": {"en": "hello", "de": "hallo"}}
    assert fmt.column_value(row, "translation.de") == "hallo"
    assert fmt.has_column(["translation"], row, "translation.en")
    assert not fmt.has_column(["translation"], row, "translation.fr")


# ---------------------------------------------------------------- layouts per architecture


def test_prepare_layouts(model_dir: Path) -> None:
    gpt, _ = prepared(model_dir, "gpt2")
    for ids, labels, n in zip(gpt["input_ids"], gpt["labels"], gpt["prompt_length"], strict=True):
        assert labels[:n] == [PAD_LABEL] * n  # the prompt never counts
        assert labels[n:] == ids[n:] and ids[-1] == 0  # target then eos (<|endoftext|> is id 0)
    bert, _ = prepared(model_dir, "bert")
    tok = loading.load_tokenizer(str(model_dir / "bert"))
    for labels in bert["labels"]:
        assert labels[0] != tok.cls_token_id and labels[-1] == tok.sep_token_id
    assert bert["reference"][0] == tiny.summary_rows(12, 7)[0]["summary"]
    assert bert["example_id"][0] == "d7-0"


def test_loss_ignores_prompt_and_padding(model_dir: Path) -> None:
    """HF's internal (shifted) loss over a padded batch equals our per-example NLL over target tokens."""
    ds, info = prepared(model_dir, "gpt2")
    tok = loading.load_tokenizer(str(model_dir / "gpt2"))
    torch.manual_seed(0)
    model = seq2seq.build_model(run_for(model_dir / "gpt2"), tok, info).eval()
    rows = ds.select_columns(list(seq2seq.TRAIN_COLUMNS))
    batch = make_collate(tok.pad_token_id, "right")([rows[i] for i in range(4)])
    assert (batch["labels"] == PAD_LABEL).any()  # some padding is there
    with torch.no_grad():
        loss = float(seq2seq.loss_fn(model, batch))
    per = seq2seq_models.token_nll(model, rows.select(range(4)), tok.pad_token_id, RT.device, 2)
    assert loss == pytest.approx(sum(per["nll"]) / sum(per["tokens"]), rel=1e-5)
    assert per["tokens"] == [float(fmt.target_token_count(lab)) for lab in rows["labels"][:4]]


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["bert", "bart", "gpt2"])
@pytest.mark.parametrize("beams", [1, 3])
def test_generation_batched_equals_one_by_one(model_dir: Path, name: str, beams: int) -> None:
    """Sorting by length and padding (left for decoder-only) must not change any output."""
    b = bench(generation={"num_beams": beams, "max_new_tokens": 5, "no_repeat_ngram_size": 2})
    ds, info = prepared(model_dir, name, b, n=7)
    tok = loading.load_tokenizer(str(model_dir / name))
    torch.manual_seed(0)
    model = seq2seq.build_model(run_for(model_dir / name), tok, info)
    settings = b.generation.model_dump()
    batched = decoding.generate_texts(model, tok, ds, {**settings, "batch_size": 4}, RT.device)
    single = decoding.generate_texts(model, tok, ds, {**settings, "batch_size": 1}, RT.device)
    assert batched == single and len(batched) == 7
    for text in batched:
        assert len(text.split()) <= 5  # max_new_tokens: a token adds at most one word


def test_generation_kwargs_follow_settings() -> None:
    kw = decoding.generation_kwargs(
        {"num_beams": 1, "max_new_tokens": 7, "no_repeat_ngram_size": 3, "length_penalty": 1.0}, 0, 2
    )
    assert kw["num_beams"] == 1 and kw["max_new_tokens"] == 7 and "length_penalty" not in kw
    kw = decoding.generation_kwargs(
        {"num_beams": 4, "max_new_tokens": 7, "no_repeat_ngram_size": 0, "length_penalty": 2.0}, 0, 2
    )
    assert kw["length_penalty"] == 2.0 and kw["do_sample"] is False


def test_saved_model_round_trip_keeps_scores(model_dir: Path, tmp_path: Path) -> None:
    """BERT2BERT (new cross-attention) and the start/pad/eos ids survive save and load."""
    ds, info = prepared(model_dir, "bert")
    tok = loading.load_tokenizer(str(model_dir / "bert"))
    torch.manual_seed(0)
    model = seq2seq.build_model(run_for(model_dir / "bert"), tok, info)
    assert model.config.decoder_start_token_id == tok.cls_token_id
    assert model.config.eos_token_id == tok.sep_token_id and model.config.pad_token_id == tok.pad_token_id
    before = seq2seq.evaluate(model, tok, ds, info, RT)
    seq2seq.save_model(model, tok, tmp_path, info)
    loaded, tok2, info2 = seq2seq.load_model(tmp_path)
    assert seq2seq.evaluate(loaded, tok2, ds, info2, RT)["perplexity"] == pytest.approx(before["perplexity"])
    assert info2 == info


# ---------------------------------------------------------------- bad input


def test_missing_and_empty_targets_are_one_line_errors() -> None:
    b = bench()
    ds = Dataset.from_list([{"document": "a b", "headline": "a"}])
    with pytest.raises(DataError, match=r"x.jsonl: column 'summary' missing .*columns\.target"):
        seq2seq.check_data(
            {"test": ds},
            b.model_copy(update={"columns": b.columns.model_copy(update={"id": None})}),
            {"test": "x.jsonl"},
        )
    ds = Dataset.from_list(
        [{"id": "1", "document": "a b", "summary": "a"}, {"id": "2", "document": "c", "summary": " "}]
    )
    with pytest.raises(DataError, match=r"x.jsonl: row 2: 'summary' is empty .*\(1 such rows\)"):
        seq2seq.check_data({"test": ds}, b, {"test": "x.jsonl"})


def test_prefix_on_a_model_without_prefixes_warns(model_dir: Path, caplog) -> None:
    b = bench(prefix="summarize: ")
    ds, info = prepared(model_dir, "bert", b)
    tok = loading.load_tokenizer(str(model_dir / "bert"))
    with caplog.at_level(logging.WARNING):
        seq2seq.build_model(run_for(model_dir / "bert"), tok, info)
    assert any("not pre-trained with task prefixes" in r.getMessage() for r in caplog.records)


def test_decoder_only_tokenizer_without_eos_or_pad_gets_them(model_dir: Path, tmp_path: Path, caplog) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / "gpt2-noeos"
    tiny.gpt2(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = tok.bos_token = None
    tok.save_pretrained(folder)
    tok = loading.load_tokenizer(str(folder))  # adds '<pad>' (no eos to reuse)
    info = {"prefix": "", "generation": bench().generation.model_dump()}
    with caplog.at_level(logging.WARNING):
        model = seq2seq.build_model(run_for(folder), tok, info)
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert any("tokenizer had no eos" in r.getMessage() for r in caplog.records)
