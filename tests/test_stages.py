"""Stages through their Prefect tasks' ``.fn``: caching by content key, data checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_rows
from tuneval.tasks import finetune_task, intrinsic_task, load_task, predict_task, prepare_task, score_task

from tuneval.config import load_config, resolve_runs
from tuneval.errors import DataError
from tuneval.pipeline.runner import all_cached
from tuneval.pipeline.stages import has_intrinsic
from tuneval.settings import Settings


def runs_of(project: Path, edit=None):
    if edit:
        raw = yaml.safe_load((project / "pipelines.yaml").read_text())
        edit(raw)
        (project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
    return resolve_runs(load_config(project / "pipelines.yaml"))


def all_stages(run, settings):
    out = {"load": load_task.fn(run, settings)}
    out["prepare"] = prepare_task.fn(run, settings, out["load"].ref)
    if has_intrinsic(run):
        out["intrinsic"] = intrinsic_task.fn(run, settings, out["prepare"].ref)
    out["finetune"] = finetune_task.fn(run, settings, out["prepare"].ref)
    out["predict"] = predict_task.fn(run, settings, out["finetune"].ref, out["prepare"].ref)
    out["score"] = score_task.fn(run, settings, out["predict"].ref, out["prepare"].ref)
    return out


def statuses(out) -> dict[str, str]:
    return {k: v.status for k, v in out.items()}


def test_stages_cache_and_rerun_only_what_changed(project: Path) -> None:
    settings = Settings.from_env(project, track=False)
    [run] = runs_of(project)
    first = all_stages(run, settings)
    assert set(statuses(first).values()) == {"ran"}
    assert set(statuses(all_stages(run, settings)).values()) == {"cached"}

    # The fine-tuned model learned the separable toy task.
    assert first["score"].ref.meta()["metrics"]["accuracy"] >= 0.9
    preds = pq.read_table(first["predict"].ref.dir / "predictions.parquet").to_pydict()
    assert len(preds["example_id"]) == 60 and len(preds["logits"][0]) == 2

    [lr_run] = runs_of(project, lambda r: r["pipelines"]["smoke"]["train"].update(learning_rate=1e-3))
    assert statuses(all_stages(lr_run, settings)) == {
        "load": "cached",
        "prepare": "cached",
        "finetune": "ran",
        "predict": "ran",
        "score": "ran",
    }

    # Speed-only knobs stay out of every key: the whole run is still cached (planned without building).
    speed = dict(eval_batch_size=7, checkpoint_every_steps=3, log_every_steps=1, keep_checkpoints=1)
    [speed_run] = runs_of(project, lambda r: r["pipelines"]["smoke"]["train"].update(speed))
    assert all_cached([speed_run], settings)
    [other_seed] = runs_of(project, lambda r: r["pipelines"]["smoke"].update(seeds=[2]))
    assert not all_cached([other_seed], settings)
    runs_of(project, lambda r: r["pipelines"]["smoke"].update(seeds=[1]))
    # transformers' forward draws other dropout masks than tuneval's kernels: another finetune.
    [hf_run] = runs_of(project, lambda r: r["pipelines"]["smoke"]["train"].update(encoder_kernels="transformers"))
    assert not all_cached([hf_run], settings)
    runs_of(project, lambda r: r["pipelines"]["smoke"]["train"].update(encoder_kernels="tuneval"))
    assert all_cached([speed_run], settings)

    [len_run] = runs_of(project, lambda r: r["benchmarks"]["toy"].update(max_length=6))
    assert statuses(all_stages(len_run, settings)) == {
        "load": "cached",
        "prepare": "ran",
        "finetune": "ran",
        "predict": "ran",
        "score": "ran",
    }

    [metric_run] = runs_of(project, lambda r: r["benchmarks"]["toy"].update(metrics=["accuracy"]))
    out = all_stages(metric_run, settings)
    assert statuses(out)["score"] == "ran" and statuses(out)["finetune"] == "cached"


def test_finetune_records_curves_and_validation(project: Path) -> None:
    settings = Settings.from_env(project, track=False)
    [run] = runs_of(project)
    out = all_stages(run, settings)
    history = json.loads((out["finetune"].ref.dir / "history.json").read_text())
    epochs = json.loads((out["finetune"].ref.dir / "epochs.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert history[-1]["loss"] < history[0]["loss"]
    # Warmup then linear decay: lr rises for the first steps, then falls.
    lrs = [h["learning_rate"] for h in history]
    assert max(lrs) > lrs[-1]


def test_max_samples_caps_are_seeded_subsets(project: Path) -> None:
    settings = Settings.from_env(project, track=False)
    [run] = runs_of(
        project, lambda r: r["pipelines"]["smoke"]["train"].update(max_train_samples=50, max_test_samples=20)
    )
    loaded = load_task.fn(run, settings)
    prepared = prepare_task.fn(run, settings, loaded.ref).ref.meta()
    assert prepared["splits"]["train"]["rows"] == 50 and prepared["splits"]["test"]["rows"] == 20


@pytest.mark.parametrize(
    "case,setup,expected",
    [
        (
            "column missing",
            lambda p: write_rows(p / "data/test.jsonl", [{"txt": "a", "label": "positive"}]),
            ["test.jsonl", "column 'text' missing", "columns.text"],
        ),
        (
            "label absent from train",
            lambda p: write_rows(p / "data/test.jsonl", [{"text": "a", "label": "neutral"}]),
            ["test.jsonl", "'neutral'", "never occurs in train"],
        ),
        (
            "mixed label types",
            lambda p: write_rows(p / "data/train.jsonl", [{"text": "a", "label": "1"}, {"text": "b", "label": 0}]),
            ["train.jsonl:2", "field 'label' is number here but str on line 1"],
        ),
        ("empty split", lambda p: (p / "data/validation.jsonl").write_text(""), ["validation.jsonl"]),
        (
            "malformed UTF-8",
            lambda p: (p / "data/test.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "x"}\n'),
            ["test.jsonl:1", "not valid UTF-8"],
        ),
        (
            "invalid JSON",
            lambda p: (p / "data/test.jsonl").write_text('{"text": "a", "label": "positive"}\n{"text": \n'),
            ["test.jsonl:2", "invalid JSON"],
        ),
    ],
)
def test_bad_data_is_one_clear_error(project: Path, case, setup, expected) -> None:
    setup(project)
    settings = Settings.from_env(project, track=False)
    [run] = runs_of(project)
    with pytest.raises(DataError) as e:
        loaded = load_task.fn(run, settings)
        prepare_task.fn(run, settings, loaded.ref)
    message = str(e.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{case}: {part!r} not in {message!r}"


def test_encoder_kernels_key_only_classification(project: Path) -> None:
    # The setting exists for every problem, but only classification has tuneval's forward: QA and
    # seq2seq keys must not change with it.
    import dataclasses

    from tuneval.pipeline.keys import finetune_key

    settings = Settings.from_env(project, track=False)
    [run] = runs_of(project)
    assert run.train.encoder_kernels == "auto"
    prepared = prepare_task.fn(run, settings, load_task.fn(run, settings).ref).ref

    def with_kernels(value: str) -> Any:
        return run.model_copy(update={"train": run.train.model_copy(update={"encoder_kernels": value})})

    hf, own = with_kernels("transformers"), with_kernels("tuneval")
    assert finetune_key(run, settings, prepared)[0] != finetune_key(hf, settings, prepared)[0]
    # auto: tuneval's forward on a CPU, transformers' on a GPU (where it was never measured to pay).
    cpu = dataclasses.replace(settings, device="cpu")
    cuda = dataclasses.replace(settings, device="cuda")
    assert finetune_key(run, cpu, prepared)[1]["spec"] == finetune_key(own, cpu, prepared)[1]["spec"]
    assert finetune_key(run, cuda, prepared)[1]["spec"] == finetune_key(hf, cuda, prepared)[1]["spec"]
    assert "encoder_forward" not in finetune_key(run, cuda, prepared)[1]["spec"]
    for other in ("extractive_qa", "seq2seq"):
        as_other = [
            r.model_copy(update={"benchmark": r.benchmark.model_copy(update={"problem": other})}) for r in (run, hf)
        ]
        keys = [finetune_key(r, settings, prepared) for r in as_other]
        assert keys[0][0] == keys[1][0] and "encoder_kernels" not in keys[0][1]["spec"]["train"]
