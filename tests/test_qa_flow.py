"""Integration: a QA pipeline on a tiny BERT, through the stages (.fn) and once through the CLI flow."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiny
from conftest import write_rows
from test_stages import all_stages, runs_of, statuses

from tuneval.cli.main import main
from tuneval.settings import Settings

pytestmark = pytest.mark.integration

QA_PIPELINES = """\
models:
  tiny: {source: ./models/bert}
benchmarks:
  toy-qa:
    problem: extractive_qa
    data: {files: {train: data/train.jsonl, validation: data/validation.jsonl, test: data/test.jsonl}}
    max_length: 48
    doc_stride: 16
    max_answer_length: 8
    metrics: [exact_match, f1]
pipelines:
  qa:
    models: [tiny]
    benchmarks: [toy-qa]
    seeds: [3]
    train: {epochs: 3, learning_rate: 3e-3, batch_size: 16, warmup_steps: 5, log_every_steps: 5,
            checkpoint: best, best_metric: f1}
"""


@pytest.fixture
def qa_project(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "models").symlink_to(model_dir, target_is_directory=True)
    write_rows(tmp_path / "data" / "train.jsonl", tiny.qa_rows(240, 1))
    write_rows(tmp_path / "data" / "validation.jsonl", tiny.qa_rows(30, 2))
    test = tiny.qa_rows(40, 3)
    test[0]["answers"]["answer_start"] = [0, 0]  # a wrong answer_start in test: kept, scored by text
    write_rows(tmp_path / "data" / "test.jsonl", test)
    (tmp_path / "pipelines.yaml").write_text(QA_PIPELINES)
    return tmp_path


def test_qa_stages_learn_cache_and_store_predictions(qa_project: Path) -> None:
    settings = Settings.from_env(qa_project, track=False)
    [run] = runs_of(qa_project)
    out = all_stages(run, settings)
    assert set(statuses(out).values()) == {"ran"}
    prep = out["prepare"].ref.meta()["splits"]
    assert prep["train"]["rows"] > prep["train"]["examples"] == 240  # long contexts gave several windows
    scores = out["score"].ref.meta()["metrics"]
    # 'masterpiece' is learnable: far above chance (a random 1-8 token span of ~40 words).
    assert scores["exact_match"] >= 60 and scores["f1"] >= scores["exact_match"]
    epochs = json.loads((out["finetune"].ref.dir / "epochs.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and {"loss", "exact_match", "f1"} <= set(epochs[0])

    table = pq.read_table(out["predict"].ref.dir / "predictions.parquet").to_pydict()
    assert len(table["id"]) == 40 and len(set(table["id"])) == 40
    assert {"id", "question", "prediction_text", "score", "probability", "gold_answers"} <= set(table)
    assert table["gold_answers"][1] == tiny.qa_rows(40, 3)[1]["answers"]["text"]
    report = json.loads((out["score"].ref.dir / "report.json").read_text())
    assert report["examples"] == 40 and report["postprocess"]["n_best"] == 20

    # Scores are recomputable from the stored predictions alone (no model).
    from tuneval.metrics.squad import squad_scores

    again = squad_scores(table["prediction_text"], table["gold_answers"])
    assert again == pytest.approx(scores)

    assert set(statuses(all_stages(run, settings)).values()) == {"cached"}
    [m_run] = runs_of(qa_project, lambda r: r["benchmarks"]["toy-qa"].update(metrics=["f1"]))
    m_out = all_stages(m_run, settings)
    assert statuses(m_out)["score"] == "ran" and statuses(m_out)["finetune"] == "cached"
    assert m_out["score"].ref.meta()["metrics"] == {"f1": pytest.approx(scores["f1"])}


def test_qa_pipeline_through_the_cli_with_mlflow(qa_project: Path, capfd) -> None:
    out = qa_project / "results.json"
    code = main(["run", "--config", str(qa_project / "pipelines.yaml"), "--json", str(out)])
    assert code == 0, capfd.readouterr().err
    run = json.loads(out.read_text())["runs"][0]
    assert run["status"] == "completed" and set(run["metrics"]) == {"exact_match", "f1"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{qa_project / 'mlruns' / 'mlflow.db'}")
    r = client.get_run(run["mlflow_run_id"])
    assert r.data.params["benchmark.problem"] == "extractive_qa"
    assert r.data.params["metric_settings.f1.module"] == "tuneval.metrics.squad"
    assert r.data.metrics["test_f1"] == pytest.approx(run["metrics"]["f1"])
    assert "val_f1" in r.data.metrics and "val_exact_match" in r.data.metrics
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"predictions", "scores", "metric_settings.json"} <= artifacts
    [out] = r.outputs.model_outputs  # the fine-tuned model: the run's LoggedModel
    model_files = {Path(a.path).name for a in client.list_logged_model_artifacts(out.model_id, "artifacts/model")}
    assert {"config.json", "model.safetensors", "tuneval_qa.json"} <= model_files


def check_errors(cfg: Path, text: str, capfd) -> list[str]:
    cfg.write_text(text)
    code = main(["check", "--config", str(cfg)])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    return [x for x in err.splitlines() if x.strip()]


def test_qa_config_errors_are_one_line_each(qa_project: Path, capfd) -> None:
    cfg = qa_project / "pipelines.yaml"
    text = QA_PIPELINES.replace("max_answer_length: 8", "max_answer_length: 8\n    n_bset: 3")
    lines = check_errors(cfg, text.replace("[exact_match, f1]", "[exact_match, accuracy]"), capfd)
    assert len(lines) == 2, lines
    assert any("toy-qa.n_bset: unknown key" in x and "doc_stride, n_best" in x for x in lines)  # QA keys listed
    assert any("toy-qa.metrics[1]" in x and "'exact_match' or 'f1'" in x for x in lines)
    [line] = check_errors(cfg, QA_PIPELINES.replace("doc_stride: 16", "doc_stride: 48"), capfd)
    assert "benchmarks.toy-qa: doc_stride (48) must be smaller than max_length (48)" in line
