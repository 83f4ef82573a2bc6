"""Resource faults during fine-tuning: out-of-memory and non-finite losses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_training import _model, _toy_dataset

from tuneval.config.train import TrainSettings
from tuneval.errors import TunevalError
from tuneval.problems import classification as clf
from tuneval.training.recovery import fit

CPU = torch.device("cpu")


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_oom_halves_the_batch_and_keeps_the_effective_batch(
    model_dir: Path, tmp_path: Path, caplog, adapter: bool
) -> None:
    ds, tok = _toy_dataset(model_dir)
    model = _model(model_dir)
    if adapter:
        from tuneval.config.train import LoraSpec
        from tuneval.models import adapters

        adapters.attach(model, LoraSpec(r=2), adapters.resolve_targets(model, "auto", "x"))
    seen: list[int] = []

    def loss(model, batch):
        n = batch["input_ids"].size(0)
        if n > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append(n)
        return clf.loss_fn(model, batch)

    s = TrainSettings(epochs=1, batch_size=16, learning_rate=1e-3, log_every_steps=1)
    with caplog.at_level(logging.WARNING):
        result = fit(model, ds, s, 0, loss, None, tok.pad_token_id, "right", CPU, tmp_path / "w", False)
    assert max(seen) == 4
    if adapter:
        assert result.trainable_parameters < sum(p.numel() for p in model.parameters()) / 2
    assert result.optimizer_steps == 2  # 32 rows / (4 x 4 accumulation) = the same 2 steps as batch 16
    assert any("out of memory; retrying with batch_size 4 x 4" in r.getMessage() for r in caplog.records)


def test_nan_under_fp16_retries_in_fp32_once(model_dir: Path, tmp_path: Path, caplog) -> None:
    ds, tok = _toy_dataset(model_dir)

    def loss(model, batch):
        value = clf.loss_fn(model, batch)
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16:
            return value * float("nan")
        return value

    s = TrainSettings(epochs=1, batch_size=8, learning_rate=1e-3, log_every_steps=1, precision="fp16")
    with caplog.at_level(logging.WARNING):
        result = fit(_model(model_dir), ds, s, 0, loss, None, tok.pad_token_id, "right", CPU, tmp_path / "w", False)
    assert result.precision == "fp32"
    assert all(h["loss"] == h["loss"] for h in result.history)  # no NaN left
    assert any("retrying from the last epoch start in fp32" in r.getMessage() for r in caplog.records)


def test_nan_in_fp32_fails_with_a_clear_message(model_dir: Path) -> None:
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(epochs=1, batch_size=8, learning_rate=1e-3, log_every_steps=1)
    with pytest.raises(TunevalError) as e:
        fit(
            _model(model_dir),
            ds,
            s,
            0,
            lambda m, b: clf.loss_fn(m, b) * float("inf"),
            None,
            tok.pad_token_id,
            "right",
            CPU,
            None,
            False,
        )
    assert "loss is" in str(e.value) and "learning_rate" in str(e.value) and "\n" not in str(e.value)


def test_predict_oom_halves_the_batch_with_the_same_outputs(model_dir: Path, caplog) -> None:
    from tuneval.inference.batched import predict_outputs

    ds, tok = _toy_dataset(model_dir)
    model = _model(model_dir).eval()

    def forward(m, batch):
        if batch["input_ids"].size(0) > 5:
            raise torch.OutOfMemoryError("simulated")
        return clf.forward_logits(m, batch)

    ds = ds.select_columns(["input_ids", "attention_mask"])
    with caplog.at_level(logging.WARNING):
        out = predict_outputs(model, ds, forward, tok.pad_token_id, "right", CPU, 32)
    ref = predict_outputs(model, ds, clf.forward_logits, tok.pad_token_id, "right", CPU, 4)
    torch.testing.assert_close(out, ref)
    assert sum("predict: out of memory" in r.getMessage() for r in caplog.records) == 3  # 32 -> 16 -> 8 -> 4
