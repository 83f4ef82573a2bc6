"""The GPU path, where a GPU is: marked ``cuda``, skipped without one (``benchmarks/gpu.sh`` runs them).

What a CUDA user gets by default must have run on CUDA: transformers' forward with SDPA, bf16
autocast, fused AdamW, ``clip_grad_norm_`` + ``step``; and the opt-in levers (compile, multi-seed
passes, DDP over nccl) must give what they give on CPU. ``TUNEVAL_CUDA_TESTS=cpu`` runs the same
bodies on the CPU (a dry run of the test code; the CUDA-only checks are skipped there).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
import torch
from test_training import _model, _toy_dataset

from tuneval import accel
from tuneval.config.train import TrainSettings
from tuneval.problems import classification as clf
from tuneval.training.device import resolve_precision
from tuneval.training.loop import train
from tuneval.training.optim import build_optimizer
from tuneval.training.recovery import fit

pytestmark = pytest.mark.cuda


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TUNEVAL_CUDA_TESTS") == "cpu":
        return torch.device("cpu")
    pytest.skip("no CUDA device (run on a GPU host: bash benchmarks/gpu.sh; TUNEVAL_CUDA_TESTS=cpu dry-runs them)")


def _cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("a check of CUDA itself")


def _train(model_dir: Path, device: torch.device, **train_settings) -> tuple[torch.nn.Module, object]:
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(**{"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "log_every_steps": 1, **train_settings})
    model = _model(model_dir)  # dropout 0: runs differ only by what is under test
    result = train(model, ds, s, 3, clf.loss_fn, None, tok.pad_token_id, "right", device, None, False)
    return model, result


def test_the_default_path_is_transformers_sdpa_fused_adamw_bf16(model_dir: Path, device: torch.device) -> None:
    levers = accel.choose(TrainSettings(), "classification", device.type)
    model = accel.apply(_model(model_dir), levers)
    if device.type == "cuda":
        assert levers == accel.MAINSTREAM and model.encoder_forward is None
        assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert model.backbone.config._attn_implementation == "sdpa"
    assert build_optimizer(model, TrainSettings(), device).defaults["fused"] is True
    # The same logits on the device as on the CPU (eval: no dropout), through that forward.
    ds, tok = _toy_dataset(model_dir)
    from tuneval.data.batching import make_collate

    batch = make_collate(tok.pad_token_id, "right")([ds[i] for i in range(8)])
    with torch.no_grad():
        want = clf.forward_logits(model.eval(), batch)
        got = clf.forward_logits(model.to(device), {k: v.to(device) for k, v in batch.items()})
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_trains_like_fp32_within_bf16_rounding(model_dir: Path, device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bf16")
    ref_model, ref = _train(model_dir, device, precision="fp32")
    model, got = _train(model_dir, device, precision="bf16")
    assert got.precision == "bf16" and ref.precision == "fp32"
    losses, want = [h["loss"] for h in got.history], [h["loss"] for h in ref.history]
    assert len(losses) == len(want) >= 8 and all(math.isfinite(x) for x in losses)
    # bf16 keeps 8 mantissa bits: the curves agree to its rounding, not to fp32's.
    torch.testing.assert_close(losses, want, atol=2e-2, rtol=2e-2)
    assert losses != want  # autocast really ran in bf16
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=2e-2, rtol=0, msg=name)


def test_compiled_training_follows_eager(model_dir: Path, device: torch.device) -> None:
    eager, ref = _train(model_dir, device, precision="fp32")
    compiled, got = _train(model_dir, device, precision="fp32", compile=True)
    torch.testing.assert_close([h["loss"] for h in got.history], [h["loss"] for h in ref.history], atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=name)


def test_a_real_cuda_out_of_memory_halves_the_batch(model_dir: Path, device: torch.device, tmp_path, caplog) -> None:
    _cuda_only(device)
    ds, tok = _toy_dataset(model_dir)
    seen: list[int] = []

    def loss(model, batch):
        n = batch["input_ids"].size(0)
        if n > 4:  # a real allocation no card holds: the CUDA allocator raises its own error
            torch.empty(1 << 45, dtype=torch.uint8, device=device)
        seen.append(n)
        return clf.loss_fn(model, batch)

    s = TrainSettings(epochs=1, batch_size=16, learning_rate=1e-3, log_every_steps=1)
    with caplog.at_level(logging.WARNING):
        result = fit(_model(model_dir), ds, s, 0, loss, None, tok.pad_token_id, "right", device, tmp_path / "w", False)
    assert max(seen) == 4 and result.optimizer_steps == 2  # the same effective batch
    assert any("out of memory; retrying with batch_size 4 x 4" in r.getMessage() for r in caplog.records)
    assert torch.cuda.memory_allocated(device) < 1 << 30  # nothing of the failed attempts is held


def test_multi_seed_pass_equals_solo_runs(model_dir: Path, device: torch.device) -> None:
    from test_fused import SEEDS
    from test_fused import _model as seed_model

    from tuneval.training import multi_seed

    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(epochs=2, batch_size=8, learning_rate=2e-3, log_every_steps=1, precision="fp32")
    solo = []
    for seed in SEEDS:
        m = seed_model(model_dir, tok, seed)
        solo.append((m, train(m, ds, s, seed, clf.loss_fn, None, tok.pad_token_id, "right", device, None, False)))
    models = [seed_model(model_dir, tok, seed) for seed in SEEDS]
    results = multi_seed.train_fused(models, SEEDS, ds, s, [None] * 3, tok.pad_token_id, "right", device, False)
    for (m_solo, r_solo), m, r in zip(solo, models, results, strict=True):
        assert [h["step"] for h in r.history] == [h["step"] for h in r_solo.history]
        torch.testing.assert_close(
            [h["loss"] for h in r.history], [h["loss"] for h in r_solo.history], atol=1e-5, rtol=1e-4
        )
        for (name, p), q in zip(m_solo.named_parameters(), m.parameters(), strict=True):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.integration
def test_ddp_over_nccl_matches_one_process(project: Path, model_dir: Path, device: torch.device) -> None:
    _cuda_only(device)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two visible GPUs")
    from test_ddp import _assert_same_training, _runs

    from tuneval.pipeline import finetune

    one, two, prep, settings, other_cache = _runs(project, model_dir)
    a = finetune.finetune(one, settings, prep, progress=False)
    b = finetune.finetune(two, other_cache, prep, progress=False)
    assert b.status == "ran" and b.ref.meta()["device"].startswith("cuda x2")
    _assert_same_training(a, b, model_dir)


def _lora_model(model_dir: Path, device: torch.device, checkpointing: bool) -> torch.nn.Module:
    from tuneval.config.train import LoraSpec
    from tuneval.models import adapters
    from tuneval.training import recompute

    model = _model(model_dir)
    adapters.attach(model, LoraSpec(r=4, dropout=0.0), adapters.resolve_targets(model, "auto", "x"))
    if checkpointing:
        recompute.enable(model)
    return model.to(device)


def test_lora_with_checkpointing_under_bf16_trains_like_without(model_dir: Path, device: torch.device) -> None:
    """LoRA + bf16 autocast + gradient checkpointing on the device: the same curve as without
    checkpointing (recomputation replays the forward). Its memory is measured by benchmarks/memory.py
    (in gpu.sh), not asserted: on the tiny model the weights, not the activations, set the peak."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bf16")
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(epochs=1, batch_size=16, learning_rate=1e-2, log_every_steps=1, precision="bf16")
    curves = []
    for checkpointing in (False, True):
        model = _lora_model(model_dir, device, checkpointing)
        result = train(model, ds, s, 3, clf.loss_fn, None, tok.pad_token_id, "right", device, None, False)
        curves.append([h["loss"] for h in result.history])
        assert result.trainable_parameters < sum(p.numel() for p in model.parameters()) / 2
    assert len(curves[0]) >= 2 and all(math.isfinite(x) for x in curves[0])
    assert curves[0] == pytest.approx(curves[1], abs=1e-3)  # bf16 rounding of one recomputed forward
