"""Crash-safe training: a killed fine-tune resumes from its checkpoint to the identical result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_training import _model, _toy_dataset

from tuneval.config.train import TrainSettings
from tuneval.problems import classification as clf
from tuneval.training import checkpoints as ckpt
from tuneval.training.loop import train


class Crash(Exception):
    pass


def _crashing(after: int):
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] > after:
            raise Crash
        return clf.loss_fn(model, batch)

    return loss


@pytest.mark.parametrize("crash_after", [5, 8, 12])  # mid-epoch, just after a checkpoint, at an epoch edge
def test_resume_reproduces_the_uninterrupted_run(model_dir: Path, tmp_path: Path, crash_after: int) -> None:
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(
        epochs=2,
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=2,
        log_every_steps=1,
        checkpoint_every_steps=3,
        keep_checkpoints=2,
        dropout=0.2,
    )
    cpu = torch.device("cpu")

    def fresh():
        torch.manual_seed(7)
        model = _model(model_dir)
        for m in model.modules():  # dropout on: its RNG stream must be restored too
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.2
        return model

    whole = fresh()
    ref = train(whole, ds, s, 11, clf.loss_fn, None, tok.pad_token_id, "right", cpu, None, progress=False)

    work = tmp_path / "work"
    with pytest.raises(Crash):
        train(fresh(), ds, s, 11, _crashing(crash_after), None, tok.pad_token_id, "right", cpu, work, False)
    assert list(work.glob("ckpt-*.pt"))
    assert len(list(work.glob("ckpt-*.pt"))) <= 3  # keep_checkpoints=2 plus the newest epoch start
    torch.manual_seed(999)  # the resumed process starts from a different RNG state
    resumed_model = fresh()
    resumed = train(resumed_model, ds, s, 11, clf.loss_fn, None, tok.pad_token_id, "right", cpu, work, False)

    assert resumed.history == ref.history
    for (name, p), q in zip(whole.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_damaged_newest_checkpoint_falls_back(tmp_path: Path, model_dir: Path) -> None:
    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(epochs=1, batch_size=4, learning_rate=1e-3, checkpoint_every_steps=2, keep_checkpoints=3)
    work = tmp_path / "work"
    with pytest.raises(Crash):
        train(
            _model(model_dir), ds, s, 1, _crashing(7), None, tok.pad_token_id, "right", torch.device("cpu"), work, False
        )
    newest = sorted(work.glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a kill during a copy would leave it
    path, payload = ckpt.load_latest(work)
    assert path != newest and payload["loop"]["step"] > 0


SLOW_PIPELINE = """\
models:
  tiny: {source: ./models/bert}
benchmarks:
  toy:
    problem: classification
    data: {files: {train: data/train.jsonl, validation: data/validation.jsonl, test: data/test.jsonl}}
    max_length: 32
pipelines:
  long:
    models: [tiny]
    benchmarks: [toy]
    seeds: [3]
    train: {epochs: 1, batch_size: 4, learning_rate: 1e-3, warmup_steps: 5, checkpoint_every_steps: 10}
"""


def _cli(project: Path, cache: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "TUNEVAL_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneval.cli",
            "run",
            "--config",
            str(project / "pipelines.yaml"),
            "--json",
            str(out),
            "--no-track",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.integration
@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_sigkill_mid_epoch_then_rerun_gives_identical_scores(project: Path, tmp_path: Path, adapter: bool) -> None:
    import tiny
    from conftest import write_rows

    write_rows(project / "data" / "train.jsonl", tiny.sentiment_rows(400, 1))
    recipe = "checkpoint_every_steps: 10, adapter: {r: 4, dropout: 0.1}}" if adapter else "checkpoint_every_steps: 10}"
    (project / "pipelines.yaml").write_text(SLOW_PIPELINE.replace("checkpoint_every_steps: 10}", recipe))

    # Reference: uninterrupted, in its own cache.
    ref = _cli(project, tmp_path / "cache-ref", tmp_path / "ref.json")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    cache = tmp_path / "cache"
    victim = _cli(project, cache, tmp_path / "killed.json")
    deadline = time.time() + 240
    while not any(int(p.name.split("-")[1]) >= 20 for p in cache.glob("finetune/*.work/ckpt-*-0.pt")):
        assert victim.poll() is None, "run ended before it could be killed: " + victim.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    if adapter:  # checkpoints hold what trains (adapters, head), not the frozen backbone
        ckpt_file = next(cache.glob("finetune/*.work/ckpt-*.pt"))
        state = torch.load(ckpt_file, map_location="cpu", weights_only=False)["model"]
        assert state and all("lora_" in n or n.startswith("classifier.") or "position" in n for n in state), list(state)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert not list(cache.glob("finetune/*/manifest.json"))  # it really died mid-training

    again = _cli(project, cache, tmp_path / "resumed.json")
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert "resuming from checkpoint" in output
    resumed = json.loads((tmp_path / "resumed.json").read_text())["runs"][0]
    reference = json.loads((tmp_path / "ref.json").read_text())["runs"][0]
    assert resumed["stages"]["load"]["status"] == "cached" and resumed["stages"]["finetune"]["status"] == "ran"
    assert resumed["metrics"] == reference["metrics"]
    logits = [
        pq.read_table(next(c.glob("predict/*/predictions.parquet"))).column("logits").to_pylist()
        for c in (cache, tmp_path / "cache-ref")
    ]
    assert logits[0] == logits[1]
    assert not list(cache.glob("finetune/*.work"))  # checkpoints removed once the artifact is committed
    shutil.rmtree(tmp_path / "cache-ref", ignore_errors=True)
