"""Seq2seq end to end on tiny models: every stage via ``.fn`` (caching, intrinsic perplexity),
bad data and bad generation settings, and once through the CLI and the Prefect flow."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiny
import yaml
from conftest import write_rows
from test_stages import all_stages, runs_of
from tuneval.tasks import load_task, prepare_task

from tuneval.cli.main import main
from tuneval.errors import ConfigError, DataError
from tuneval.settings import Settings

pytestmark = pytest.mark.integration

PIPELINES = """\
models:
  b2b: {source: ./models/bert}
  gpt: {source: ./models/gpt2}
  bart: {source: ./models/bart}
benchmarks:
  toysum:
    problem: seq2seq
    data: {files: {train: data/train.jsonl, validation: data/validation.jsonl, test: data/test.jsonl}}
    columns: {source: document, target: summary, id: id}
    max_source_length: 16
    max_target_length: 6
    generation: {num_beams: 2, max_new_tokens: 5, no_repeat_ngram_size: 2, batch_size: 8}
    metrics: [rouge1, rouge2, rougeL, rougeLsum, bleu, chrf, perplexity]
pipelines:
  s2s:
    models: [b2b]
    benchmarks: [toysum]
    seeds: [1]
    train: {epochs: 3, learning_rate: 3e-3, batch_size: 16, warmup_steps: 2, log_every_steps: 2,
            checkpoint: best, best_metric: token_accuracy}
"""


@pytest.fixture
def s2s_project(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "models").symlink_to(model_dir, target_is_directory=True)
    write_rows(tmp_path / "data" / "train.jsonl", tiny.summary_rows(160, 1))
    write_rows(tmp_path / "data" / "validation.jsonl", tiny.summary_rows(24, 2))
    write_rows(tmp_path / "data" / "test.jsonl", tiny.summary_rows(30, 3))
    (tmp_path / "pipelines.yaml").write_text(PIPELINES)
    return tmp_path


@pytest.mark.parametrize("model", ["b2b", "gpt", "bart"])
def test_stages_fine_tune_below_pretrained_perplexity(s2s_project: Path, model: str) -> None:
    settings = Settings.from_env(s2s_project, track=False)
    [run] = runs_of(s2s_project, lambda r: r["pipelines"]["s2s"].update(models=[model]))
    out = all_stages(run, settings)
    assert {o.status for o in out.values()} == {"ran"}
    pretrained = out["intrinsic"].ref.meta()["metrics"]["pretrained_perplexity"]
    scores = out["score"].ref.meta()["metrics"]
    # Fine-tuning on the copy-the-first-words task must beat the untrained starting point.
    assert scores["perplexity"] < 0.5 * pretrained
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "perplexity"}
    table = pq.read_table(out["predict"].ref.dir / "predictions.parquet").to_pydict()
    assert len(table["prediction"]) == 30 and table["example_id"][0] == "d3-0"
    assert table["reference"][0] == tiny.summary_rows(30, 3)[0]["summary"]
    assert all(n > 0 for n in table["target_tokens"])
    report = json.loads((out["score"].ref.dir / "report.json").read_text())
    assert report["examples"] == 30 and "tok:13a" in report["bleu_signature"]
    assert {o.status for o in all_stages(run, settings).values()} == {"cached"}


def test_intrinsic_is_shared_by_seeds_and_recipes(s2s_project: Path) -> None:
    settings = Settings.from_env(s2s_project, track=False)
    [run] = runs_of(s2s_project, lambda r: r["pipelines"]["s2s"]["train"].update(epochs=1))
    first = all_stages(run, settings)
    [other] = runs_of(s2s_project, lambda r: r["pipelines"]["s2s"].update(seeds=[2]))
    second = all_stages(other, settings)
    assert second["intrinsic"].status == "cached" and second["finetune"].status == "ran"
    assert second["intrinsic"].ref.key == first["intrinsic"].ref.key
    [metric_run] = runs_of(s2s_project, lambda r: r["benchmarks"]["toysum"].update(metrics=["chrf"]))
    third = all_stages(metric_run, settings)
    assert third["score"].status == "ran" and third["predict"].status == "cached"
    assert set(third["score"].ref.meta()["metrics"]) == {"chrf"}
    # Generation settings change predictions only: no re-tokenizing, no retraining.
    [beam_run] = runs_of(s2s_project, lambda r: r["benchmarks"]["toysum"]["generation"].update(num_beams=1))
    fourth = all_stages(beam_run, settings)
    # (score reruns only if the predictions' content changed: its key is their fingerprint)
    assert {k: v.status for k, v in fourth.items() if k != "score"} == {
        "load": "cached",
        "prepare": "cached",
        "intrinsic": "cached",
        "finetune": "cached",
        "predict": "ran",
    }


@pytest.mark.parametrize(
    "rows,expected",
    [
        (
            [{"id": "1", "document": "a b", "headline": "a"}],
            ["test.jsonl", "column 'summary' missing", "columns.target"],
        ),
        (
            [{"id": "1", "document": "a b", "summary": "a"}, {"id": "2", "document": "c d", "summary": ""}],
            ["test.jsonl", "row 2", "'summary' is empty", "columns.target"],
        ),
    ],
)
def test_bad_seq2seq_data_is_one_clear_error(s2s_project: Path, rows, expected) -> None:
    write_rows(s2s_project / "data" / "test.jsonl", rows)
    settings = Settings.from_env(s2s_project, track=False)
    [run] = runs_of(s2s_project)
    with pytest.raises(DataError) as e:
        prepare_task.fn(run, settings, load_task.fn(run, settings).ref)
    assert "\n" not in str(e.value)
    for part in expected:
        assert part in str(e.value)


def test_generation_settings_out_of_range_are_config_errors(s2s_project: Path) -> None:
    def edit(raw):
        raw["benchmarks"]["toysum"]["generation"] = {"num_beams": 0, "max_new_tokens": 5000, "length_penalty": 2}
        raw["benchmarks"]["toysum"]["metrics"] = ["rouge1", "accuracy"]

    with pytest.raises(ConfigError) as e:
        runs_of(s2s_project, edit)
    lines = e.value.problems
    assert any("generation.num_beams" in m and "greater than or equal to 1" in m for m in lines)
    assert any("generation.max_new_tokens" in m and "less than or equal to 1024" in m for m in lines)
    assert any("metrics[1]" in m for m in lines)

    def greedy_penalty(raw):
        raw["benchmarks"]["toysum"]["generation"] = {"num_beams": 1, "length_penalty": 2.0}

    with pytest.raises(ConfigError, match="length_penalty only applies to beam search"):
        runs_of(s2s_project, greedy_penalty)


def test_cli_runs_the_seq2seq_flow_decoder_only(s2s_project: Path, capfd) -> None:
    raw = yaml.safe_load((s2s_project / "pipelines.yaml").read_text())
    raw["pipelines"]["s2s"]["models"] = ["gpt"]
    (s2s_project / "pipelines.yaml").write_text(yaml.safe_dump(raw))
    out = s2s_project / "results.json"
    code = main(["run", "--config", str(s2s_project / "pipelines.yaml"), "--json", str(out)])
    assert code == 0, capfd.readouterr().err
    run = json.loads(out.read_text())["runs"][0]
    assert run["status"] == "completed"
    assert list(run["stages"]) == ["load", "prepare", "intrinsic", "finetune", "predict", "score"]
    m = run["metrics"]
    assert m["perplexity"] < m["pretrained_perplexity"] and "rougeLsum" in m and "bleu" in m

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{s2s_project / 'mlruns' / 'mlflow.db'}")
    r = client.get_run(run["mlflow_run_id"])
    assert r.data.metrics["test_pretrained_perplexity"] == pytest.approx(m["pretrained_perplexity"])
    assert r.data.metrics["test_perplexity"] == pytest.approx(m["perplexity"])
    assert "tok:13a" in r.data.params["metric_settings.bleu.bleu_signature"]
    assert r.data.params["benchmark.problem"] == "seq2seq"
