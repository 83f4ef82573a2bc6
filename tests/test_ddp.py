"""Data-parallel fine-tuning (train.devices > 1): sharding, loss weighting, config check, and two
gloo processes under torchrun ending where one process with the same global batch ends."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_seq2seq import bench as seq2seq_bench
from test_seq2seq import prepared as seq2seq_prepared
from test_seq2seq import run_for
from test_stages import runs_of

from tuneval.config import load_config
from tuneval.data.batching import PAD_LABEL, make_collate
from tuneval.errors import ConfigError
from tuneval.models import loading
from tuneval.problems import seq2seq
from tuneval.settings import Settings
from tuneval.training.distributed import Dist, loss_units, shard


@pytest.mark.parametrize("n", [0, 1, 3, 5, 8, 9])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_contiguous_balanced_and_cover_the_batch(n: int, world: int) -> None:
    batch = [10 + i for i in range(n)]
    parts = [shard(batch, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == batch  # in order: rank r holds the r-th slice
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_an_empty_shard_stands_in_with_zero_weight() -> None:
    """A rank left without rows still joins the all-reduce, on one borrowed row that counts nothing."""
    assert Dist(world_size=2, rank=1).shard([7]) == ([7], False)
    assert Dist(world_size=2, rank=0).shard([7]) == ([7], True)
    assert Dist().shard([7, 8]) == ([7, 8], True)


def test_loss_units_are_rows_or_label_tokens() -> None:
    assert loss_units({"input_ids": torch.zeros(3, 5), "labels": torch.tensor([0, 1, 1])}) == 3
    labels = torch.tensor([[PAD_LABEL, 4, 5], [PAD_LABEL, PAD_LABEL, 6]])
    assert loss_units({"input_ids": torch.zeros(2, 3), "labels": labels}) == 3


@pytest.mark.parametrize("name", ["gpt2", "bart"])
def test_token_shares_turn_the_ddp_mean_into_the_global_batch_gradient(model_dir: Path, name: str) -> None:
    """Shards with unequal label-token counts: the mean over ranks of world * share * grad(shard loss),
    what DDP computes from ``scale_for_backward``, is the gradient of the whole batch's token mean."""
    ds, info = seq2seq_prepared(model_dir, name, seq2seq_bench(max_target_length=32), n=6)
    tok = loading.load_tokenizer(str(model_dir / name))
    torch.manual_seed(0)
    model = seq2seq.build_model(run_for(model_dir / name), tok, info).eval()  # eval: no dropout
    rows = ds.select_columns(list(seq2seq.TRAIN_COLUMNS))
    collate = make_collate(tok.pad_token_id, "right")
    batch = list(range(5))

    def grads(idx: list[int], scale: float = 1.0) -> list[torch.Tensor]:
        model.zero_grad()
        (seq2seq.loss_fn(model, collate([rows[i] for i in idx])) * scale).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    world = 2
    shards = [shard(batch, r, world) for r in range(world)]
    units = [loss_units(collate([rows[i] for i in s])) for s in shards]

    def ddp_mean(weights: list[float]) -> list[torch.Tensor]:
        per_rank = [grads(s, world * w / sum(weights)) for s, w in zip(shards, weights, strict=True)]
        return [sum(gs) / world for gs in zip(*per_rank, strict=True)]

    want = grads(batch)
    for got, exact in zip(ddp_mean(units), want, strict=True):
        torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-5)
    # Weighting by rows instead would be off: the shards hold unequal tokens per row.
    by_rows = ddp_mean([len(s) for s in shards])
    assert not all(torch.allclose(g, w, atol=1e-6, rtol=1e-5) for g, w in zip(by_rows, want, strict=True))


def test_batch_size_not_divisible_by_devices_is_one_config_error(project: Path) -> None:
    """Checked on each pipeline's merged recipe: devices 3 with the defaults' batch 12 is fine."""
    import yaml
    from test_cli import assert_user_error, tuneval

    raw = yaml.safe_load((project / "pipelines.yaml").read_text())
    raw["defaults"] = {"train": {"batch_size": 12}}
    raw["pipelines"]["smoke"]["train"] = {"devices": 3}
    raw["pipelines"]["odd"] = {"models": ["tiny"], "benchmarks": ["toy"], "train": {"devices": 5}}
    text = yaml.safe_dump(raw)
    (project / "pipelines.yaml").write_text(text)
    line = text.splitlines().index("      devices: 5") + 1
    with pytest.raises(ConfigError) as e:
        load_config(project / "pipelines.yaml")
    assert e.value.problems == [
        f"pipelines.yaml:{line}: pipelines.odd.train.devices: batch_size 12 is not divisible by devices 5; each "
        "device takes batch_size / devices rows of every batch: use a batch_size that is a multiple of 5"
    ]
    assert_user_error(tuneval("check", cwd=project), "pipelines.odd.train.devices", "multiple of 5")


def _no_dropout_bert(model_dir: Path, folder: Path) -> Path:
    """The tiny BERT with every dropout 0, so that no mask draw can tell the runs apart."""
    shutil.copytree(model_dir / "bert", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _runs(project: Path, model_dir: Path):
    """The same run with devices 1 and 2, its prepared data, and settings with two separate caches."""
    from tuneval.tasks import load_task, prepare_task

    _no_dropout_bert(model_dir, project / "bert-nodrop")

    def edit(raw: dict) -> None:
        raw["models"]["tiny"]["source"] = "./bert-nodrop"
        raw["pipelines"]["smoke"]["train"] = {
            "epochs": 4,
            "learning_rate": 2e-3,
            "batch_size": 8,
            "gradient_accumulation_steps": 2,
            "warmup_steps": 2,
            "dropout": 0.0,
            "log_every_steps": 3,  # a running loss sum crosses the checkpoints
            "max_train_samples": 101,
            "checkpoint_every_steps": 5,
        }

    [one] = runs_of(project, edit)
    two = one.model_copy(update={"train": one.train.model_copy(update={"devices": 2})})
    settings = Settings.from_env(project, track=False)
    prep = prepare_task.fn(one, settings, load_task.fn(one, settings).ref).ref
    return one, two, prep, settings, dataclasses.replace(settings, cache_dir=settings.cache_dir / "ddp")


def _assert_same_training(a, b, model_dir: Path) -> None:
    from safetensors.torch import load_file

    # devices is in the key: with dropout on, each rank draws other masks (another sample)
    assert a.ref.key != b.ref.key
    assert b.ref.meta()["devices"] == 2 and b.ref.meta()["optimizer_steps"] == a.ref.meta()["optimizer_steps"] == 28
    curves = [json.loads((x.ref.dir / "history.json").read_text()) for x in (a, b)]
    assert [h["step"] for h in curves[0]] == [h["step"] for h in curves[1]]
    assert curves[0][-1]["loss"] < curves[0][0]["loss"]  # it learned something worth comparing
    for key in ("loss", "learning_rate"):
        got, want = (torch.tensor([h[key] for h in c]) for c in (curves[1], curves[0]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    epochs = [json.loads((x.ref.dir / "epochs.json").read_text()) for x in (a, b)]
    assert [e["accuracy"] for e in epochs[0]] == [e["accuracy"] for e in epochs[1]]
    for part in ("backbone/model.safetensors", "head.safetensors"):
        want, got = (load_file(str(x.ref.dir / "model" / part)) for x in (a, b))
        assert want.keys() == got.keys()
        for name in want:
            if name.endswith("attention.self.key.bias"):
                # Softmax ignores a shift shared by all keys, so this bias has no gradient: what it
                # gets is ~1e-9 of float noise that depends on summation order (one batch of 8 vs
                # two shards of 4), and Adam scales noise up to steps of ~lr/10. Nothing to compare.
                continue
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    loaded = load_file(str(model_dir / "bert" / "model.safetensors"))
    tuned = load_file(str(a.ref.dir / "model" / "backbone" / "model.safetensors"))
    assert any(not torch.equal(tuned[n], loaded[n]) for n in tuned if n in loaded)  # the backbone trained


@pytest.mark.integration
def test_two_gloo_processes_match_one_process(project: Path, model_dir: Path) -> None:
    """torchrun with 2 gloo processes x 4 rows = one process x 8 rows: the same weights, curves and
    validation, through the finetune stage. 101 rows make each epoch's last batch 5 rows (3 + 2),
    accumulation exercises no_sync, and rank 0 writes checkpoints on the way."""
    from tuneval.pipeline import finetune

    one, two, prep, settings, other_cache = _runs(project, model_dir)
    a = finetune.finetune(one, settings, prep, progress=False)
    b = finetune.finetune(two, other_cache, prep, progress=False)
    assert b.status == "ran"
    _assert_same_training(a, b, model_dir)


@pytest.mark.integration
def test_two_gloo_processes_match_one_process_with_lora(project: Path, model_dir: Path) -> None:
    """The same with LoRA adapters: DDP syncs only what trains (adapters, head); the saved adapters
    and head of 2 x 4 rows equal those of 1 x 8 rows."""
    from safetensors.torch import load_file

    from tuneval.config.train import LoraSpec
    from tuneval.models import finetuned
    from tuneval.pipeline import finetune

    one, two, prep, settings, other_cache = _runs(project, model_dir)
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    one, two = (r.model_copy(update={"train": r.train.model_copy(update={"adapter": lora})}) for r in (one, two))
    a = finetune.finetune(one, settings, prep, progress=False)
    b = finetune.finetune(two, other_cache, prep, progress=False)
    assert b.status == "ran" and b.ref.meta()["devices"] == 2
    assert a.ref.meta()["trainable_parameters"] < a.ref.meta()["total_parameters"] / 3
    curves = [json.loads((x.ref.dir / "history.json").read_text()) for x in (a, b)]
    assert curves[0][-1]["loss"] < curves[0][0]["loss"]
    got, want = (torch.tensor([h["loss"] for h in c]) for c in (curves[1], curves[0]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    want, got = (load_file(str(x.ref.dir / "model" / finetuned.TRAINED_FILE)) for x in (a, b))
    assert want.keys() == got.keys() and any("lora_B" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


FAILING_WORKER = """
import json, os, sys, time
from pathlib import Path
from tuneval.pipeline.ddp_worker import report_user_error
from tuneval.errors import TunevalError
work = Path(json.loads(Path(sys.argv[1]).read_text())["work_dir"])
if os.environ["RANK"] == "1":
    report_user_error(work, 1, TunevalError("finetune: out of memory on one of 2 devices; lower train.batch_size"))
    sys.exit(2)
time.sleep(60)  # rank 0 waits, as in a collective: torchrun must stop it
(work / "rank0-finished").write_text("")
"""


def test_a_user_error_on_any_rank_comes_back_as_one_line(tmp_path: Path, monkeypatch, capfd) -> None:
    import os

    from tuneval.errors import TunevalError
    from tuneval.training.launch import launch

    (tmp_path / "failing_worker.py").write_text(FAILING_WORKER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    work = tmp_path / "work"
    with pytest.raises(TunevalError, match="^finetune: out of memory on one of 2 devices; lower train.batch_size$"):
        launch(2, {"work_dir": str(work)}, work, module="failing_worker")
    assert not (work / "rank0-finished").exists()  # torchrun stopped the waiting rank
    assert "Traceback" not in capfd.readouterr().err  # torchrun's failure report is not relayed
