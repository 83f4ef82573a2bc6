"""Fused seed training (``tuneval.fused``): each seed's slice equals its solo run.

Tolerance (fp32, CPU): parameters and logged losses within rtol 1e-4 / atol 1e-5 of the solo run;
in practice the difference is ~1e-6 (summation order of batched kernels). Dropout is on (hashed
masks), the last batch is ragged and the seeds' batches pad to different lengths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_flow import mlflow_client, run_cli
from test_stages import runs_of
from tuneval.tasks import load_task, predict_task, prepare_task, score_task

from tuneval import accel
from tuneval.config.train import TrainSettings
from tuneval.data.batching import length_grouped_batches
from tuneval.pipeline import finetune, finetune_group, keys
from tuneval.problems import classification
from tuneval.settings import Settings
from tuneval.training import hash_dropout, loop, multi_seed
from tuneval.training.device import seed_everything

RTOL, ATOL = 1e-4, 1e-5
SEEDS = [1, 2, 3]


def test_hash_masks_reproducible_distinct_padding_invariant() -> None:
    state = torch.tensor([7, 0])
    a = hash_dropout.keep_mask(torch.Size([3, 8, 40]), state, site=2, p=0.1)
    assert torch.equal(a, hash_dropout.keep_mask(torch.Size([3, 8, 40]), state, site=2, p=0.1))
    # An element keeps its mask when the tensor is padded with rows and positions.
    assert torch.equal(hash_dropout.keep_mask(torch.Size([2, 5, 40]), state, 2, 0.1), a[:2, :5])
    others = [
        hash_dropout.keep_mask(torch.Size([3, 8, 40]), torch.tensor([8, 0]), 2, 0.1),  # another seed
        hash_dropout.keep_mask(torch.Size([3, 8, 40]), torch.tensor([7, 1]), 2, 0.1),  # the next call
        hash_dropout.keep_mask(torch.Size([3, 8, 40]), state, 3, 0.1),  # another site
    ]
    assert all(not torch.equal(a, o) for o in others)
    big = hash_dropout.keep_mask(torch.Size([200, 500]), state, 0, 0.25)
    assert abs(big.float().mean().item() - 0.75) < 0.01
    drop = hash_dropout.HashDropout(0.5, seed=3, site=0).train()
    x = torch.ones(4, 6)
    y1, y2 = drop(x), drop(x)
    assert set(y1.unique().tolist()) == {0.0, 2.0} and not torch.equal(y1, y2)
    assert drop.hash_state.tolist() == [3, 2]  # the call counter, part of the state_dict (checkpoints)


@pytest.fixture(scope="module")
def toy(model_dir: Path):
    """A tokenized toy train set (100 rows: batches of 16 leave a ragged 4) and validation set."""
    import tiny
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir / "bert")

    def encode(rows):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=32, return_token_type_ids=True)
        labels = [int(r["label"] == "positive") for r in rows]
        return Dataset.from_dict({**{k: enc[k] for k in classification.TRAIN_COLUMNS[:3]}, "labels": labels})

    return tok, encode(tiny.sentiment_rows(100, 1)), encode(tiny.sentiment_rows(24, 2))


def _model(model_dir: Path, tok, seed: int):
    class Spec:
        revision, trust_remote_code, pooling = None, False, "auto"

    seed_everything(seed)
    model = classification.new_classifier(str(model_dir / "bert"), Spec, tok, 2, None)
    hash_dropout.install(model, seed)
    return model


def test_fused_equals_solo_per_seed(model_dir: Path, toy) -> None:
    tok, train_ds, val_ds = toy
    s = TrainSettings(
        epochs=2,
        learning_rate=2e-3,
        batch_size=16,
        gradient_accumulation_steps=2,  # 7 batches: the last optimizer step has one micro-batch
        warmup_steps=2,
        max_grad_norm=0.5,
        log_every_steps=1,
        precision="fp32",
        checkpoint="best",
    )
    lengths = [len(x) for x in train_ds["input_ids"]]
    plans = [length_grouped_batches(lengths, 16, torch.Generator().manual_seed(sd)) for sd in SEEDS]
    # The cases this test is about do occur: at some step one seed's batch is the ragged one and
    # the others' are not, and the seeds' longest rows differ (so the fused batch pads further).
    assert any(len({len(p[i]) for p in plans}) > 1 for i in range(len(plans[0])))
    assert any(len({max(lengths[j] for j in p[i]) for p in plans}) > 1 for i in range(len(plans[0])))
    dev = torch.device("cpu")
    rt = classification.Runtime(device=dev, precision="fp32", batch_size=64)

    def evaluate(m):
        return classification.evaluate(m, tok, val_ds, {"label_names": ["negative", "positive"]}, rt)

    solo = []
    for sd in SEEDS:
        m = _model(model_dir, tok, sd)
        r = loop.train(
            m, train_ds, s, sd, classification.loss_fn, evaluate, tok.pad_token_id, "right", dev, None, False
        )
        solo.append((m, r))
    models = [_model(model_dir, tok, sd) for sd in SEEDS]
    assert multi_seed.why_not(models, [s] * 3, "fp32") is None
    results = multi_seed.train_fused(models, SEEDS, train_ds, s, [evaluate] * 3, tok.pad_token_id, "right", dev, False)

    for (m_solo, r_solo), m_fused, r_fused in zip(solo, models, results, strict=True):
        want, got = dict(m_solo.named_parameters()), dict(m_fused.named_parameters())
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=name)
        assert [h["step"] for h in r_fused.history] == [h["step"] for h in r_solo.history] == list(range(1, 9))
        for a, b in zip(r_fused.history, r_solo.history, strict=True):
            assert math.isclose(a["loss"], b["loss"], rel_tol=RTOL, abs_tol=ATOL)
            assert a["learning_rate"] == b["learning_rate"]
        assert [e["loss"] for e in r_fused.epochs] == pytest.approx([e["loss"] for e in r_solo.epochs], rel=RTOL)
        assert r_fused.kept_epoch == r_solo.kept_epoch and r_fused.samples == r_solo.samples == 200
    # The seeds are different models (own head init, data order and dropout masks).
    heads = [m.classifier.weight for m in models]
    assert not torch.allclose(heads[0], heads[1]) and not torch.allclose(heads[1], heads[2])


def test_why_not_names_the_reason(model_dir: Path, toy) -> None:
    tok = toy[0]
    models = [_model(model_dir, tok, sd) for sd in (1, 2)]
    s = TrainSettings()
    assert "differ" in multi_seed.why_not(models, [s, s.model_copy(update={"learning_rate": 1e-4})], "fp32")
    assert "fp16" in multi_seed.why_not(models, [s, s], "fp16")
    assert "fewer than 2" in multi_seed.why_not(models[:1], [s], "fp32")
    # fuse_seeds itself does not count as a difference.
    assert multi_seed.why_not(models, [s, s.model_copy(update={"fuse_seeds": True})], "fp32") is None


def _fused_project(project: Path, seeds=SEEDS, **train):
    def edit(raw):
        raw["pipelines"]["smoke"]["seeds"] = list(seeds)
        raw["pipelines"]["smoke"]["train"].update({"fuse_seeds": True, **train})

    return runs_of(project, edit)


def test_fused_stage_artifacts_per_seed_cached_and_equal_to_solo(project: Path) -> None:
    settings = Settings.from_env(project, track=False)
    runs = _fused_project(project)
    prepared = prepare_task.fn(runs[0], settings, load_task.fn(runs[0], settings).ref).ref
    outcomes, reason = finetune_group.finetune_seeds(runs, settings, prepared, progress=False)
    assert reason is None and sorted(outcomes) == SEEDS
    assert {o.status for o in outcomes.values()} == {"fused"}
    for run in runs:
        # The solo stage finds each seed's artifact under its own key; predict and score work on it.
        tuned = finetune.finetune(run, settings, prepared, progress=False)
        assert tuned.status == "cached" and tuned.ref.key == outcomes[run.seed].ref.key
        meta = tuned.ref.meta()
        assert meta["fused_seeds"] == SEEDS and meta["dropout_masks"] == "hash"
        assert (tuned.ref.dir / "model" / classification.HEAD_FILE).is_file()
        assert len(json.loads((tuned.ref.dir / "history.json").read_text())) > 0
        predicted = predict_task.fn(run, settings, tuned.ref, prepared)
        assert score_task.fn(run, settings, predicted.ref, prepared).ref.meta()["metrics"]["accuracy"] >= 0.9
    assert finetune_group.finetune_seeds(runs, settings, prepared, progress=False) == ({}, "0 seed(s) left to train")

    # One seed's artifact lost: it is trained alone (hashed dropout too) and lands within tolerance.
    from safetensors.torch import load_file

    lost = outcomes[2].ref.dir
    fused_head = load_file(str(lost / "model" / classification.HEAD_FILE))
    import shutil

    shutil.rmtree(lost)
    assert finetune_group.finetune_seeds(runs, settings, prepared, progress=False) == ({}, "1 seed(s) left to train")
    solo = finetune.finetune(runs[1], settings, prepared, progress=False)
    assert solo.status == "ran" and solo.ref.key == outcomes[2].ref.key
    solo_head = load_file(str(solo.ref.dir / "model" / classification.HEAD_FILE))
    for name in fused_head:
        torch.testing.assert_close(solo_head[name], fused_head[name], rtol=RTOL, atol=ATOL)


def test_fusion_off_keeps_the_solo_key(project: Path) -> None:
    settings = Settings.from_env(project, track=False)
    [off] = runs_of(project)  # the default: off
    assert off.train.fuse_seeds is False and not keys.hashed_dropout(off)
    [on] = _fused_project(project, seeds=[1])
    prepared = prepare_task.fn(off, settings, load_task.fn(off, settings).ref).ref
    key_off, parts_off = keys.finetune_key(off, settings, prepared)
    key_on, parts_on = keys.finetune_key(on, settings, prepared)
    # Only the dropout scheme separates them (hashed masks vs those of tuneval's CPU forward),
    # never the switch itself.
    assert key_off != key_on and parts_on["spec"].pop("dropout_masks") == "hash"
    assert parts_off["spec"].pop("encoder_forward") == f"tuneval-{accel.FORWARD_VERSION}"
    assert parts_on["spec"] == parts_off["spec"] and "fuse_seeds" not in parts_on["spec"]["train"]


@pytest.mark.integration
def test_flow_fuses_a_seed_group(project: Path, capfd) -> None:
    cfg = project / "pipelines.yaml"
    cfg.write_text(cfg.read_text().replace("seeds: [1]", "seeds: [1, 2]").replace("epochs: 2", "epochs: 1"))
    cfg.write_text(cfg.read_text().replace("log_every_steps: 2}", "log_every_steps: 2, fuse_seeds: true}"))
    code, first = run_cli(project)
    assert code == 0, capfd.readouterr().err
    assert [r["stages"]["finetune"]["status"] for r in first["runs"]] == ["fused", "fused"]
    assert all(r["status"] == "completed" and "accuracy" in r["metrics"] for r in first["runs"])
    client = mlflow_client(project)
    for r in first["runs"]:
        tags = client.get_run(r["mlflow_run_id"]).data.tags
        assert tags["tuneval.fused_seeds"] == "1,2" and tags["tuneval.stage.finetune"] == "fused"
        assert "mlflow.parentRunId" in tags
    # --force finetune: one fused pass again (not a solo retrain after it), then predict and score.
    code, forced = run_cli(project, "--force", "finetune")
    assert code == 0
    assert [{k: v["status"] for k, v in r["stages"].items()} for r in forced["runs"]] == [
        {"load": "cached", "prepare": "cached", "finetune": "fused", "predict": "ran", "score": "ran"}
    ] * 2
    keys = [[r["stages"]["finetune"]["key"] for r in res["runs"]] for res in (first, forced)]
    assert keys[0] == keys[1]
    code, cached = run_cli(project)  # everything cached: the plain path, no Prefect, no fusing
    assert code == 0
    assert {s["status"] for r in cached["runs"] for s in r["stages"].values()} == {"cached"}
    assert [r["metrics"] for r in cached["runs"]] == [r["metrics"] for r in forced["runs"]]


def test_hashed_dropout_solo_run_resumes_exactly(model_dir: Path, tmp_path: Path) -> None:
    """The mask counters are buffers: checkpoints carry them, so a resumed solo run draws the
    masks the uninterrupted one drew (a fused pass that is interrupted reruns, or its seeds train
    solo and resume like this)."""
    from test_resume import Crash, _crashing
    from test_training import _model, _toy_dataset

    ds, tok = _toy_dataset(model_dir)
    s = TrainSettings(
        epochs=2, batch_size=4, learning_rate=1e-3, warmup_steps=2, log_every_steps=1, checkpoint_every_steps=3
    )
    cpu = torch.device("cpu")

    def fresh():
        torch.manual_seed(7)
        model = _model(model_dir)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.2
        assert hash_dropout.install(model, 11) > 0
        return model

    whole = fresh()
    ref = loop.train(whole, ds, s, 11, classification.loss_fn, None, tok.pad_token_id, "right", cpu, None, False)
    assert whole.dropout.hash_state[1] > 0  # masks were drawn
    work = tmp_path / "work"
    with pytest.raises(Crash):
        loop.train(fresh(), ds, s, 11, _crashing(5), None, tok.pad_token_id, "right", cpu, work, False)
    resumed_model = fresh()
    resumed = loop.train(
        resumed_model, ds, s, 11, classification.loss_fn, None, tok.pad_token_id, "right", cpu, work, False
    )
    assert resumed.history == ref.history
    for (name, p), q in zip(whole.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_an_interrupted_multi_seed_pass_resumes_to_the_same_result(
    model_dir: Path, toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The multi-seed pass runs the solo loop, checkpoints included: killed part-way, it resumes
    from the newest checkpoint (stacked weights, AdamW state, each seed's data order and mask
    counters) and ends where the uninterrupted pass ends, bit for bit."""
    from test_resume import Crash

    tok, train_ds, val_ds = toy
    s = TrainSettings(
        epochs=2, learning_rate=2e-3, batch_size=16, warmup_steps=2, log_every_steps=1, checkpoint_every_steps=2
    )
    seeds, dev = SEEDS[:2], torch.device("cpu")
    rt = classification.Runtime(device=dev, precision="fp32", batch_size=64)

    def evaluate(m):
        return classification.evaluate(m, tok, val_ds, {"label_names": ["negative", "positive"]}, rt)

    def fused(work: Path | None):
        models = [_model(model_dir, tok, sd) for sd in seeds]
        return models, multi_seed.train_fused(
            models, seeds, train_ds, s, [evaluate] * 2, tok.pad_token_id, "right", dev, False, work_dir=work
        )

    whole, ref = fused(None)
    real = multi_seed.Stacked.losses
    calls = {"n": 0}

    def crashing(self, batch):
        calls["n"] += 1
        if calls["n"] > 9:  # epoch 2, between checkpoints
            raise Crash
        return real(self, batch)

    work = tmp_path / "work"
    monkeypatch.setattr(multi_seed.Stacked, "losses", crashing)
    with pytest.raises(Crash):
        fused(work)
    monkeypatch.setattr(multi_seed.Stacked, "losses", real)
    assert list(work.glob("ckpt-*.pt"))
    torch.manual_seed(999)  # the resumed process starts from another RNG state
    resumed_models, resumed = fused(work)
    for a, b, m_ref, m_res in zip(ref, resumed, whole, resumed_models, strict=True):
        assert a.history == b.history and a.epochs == b.epochs and len(a.epochs) == 2
        for (name, p), q in zip(m_ref.named_parameters(), m_res.parameters(), strict=True):
            assert torch.equal(p, q), name
