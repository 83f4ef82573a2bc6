"""The fine-tuned model as an MLflow LoggedModel: loadable by URI, predicting what tuneval predicted.

Runs go through the plain stage functions (``runner.run_plain``, no Prefect: the MLflow record is
the same) on tiny config-built models, one per problem kind.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import tiny
import yaml
from conftest import write_rows
from test_qa_flow import QA_PIPELINES
from test_seq2seq_flow import PIPELINES as S2S_PIPELINES

from tuneval.config import load_config, resolve_runs
from tuneval.pipeline import runner
from tuneval.settings import Settings
from tuneval.tracking.pyfunc_model import nest, placeholder_rows

pytestmark = pytest.mark.integration


def run_plain(project: Path, edit=None) -> list[dict]:
    cfg = project / "pipelines.yaml"
    if edit:
        raw = yaml.safe_load(cfg.read_text())
        edit(raw)
        cfg.write_text(yaml.safe_dump(raw))
    loaded = load_config(cfg)
    return runner.run_groups(resolve_runs(loaded), Settings.from_env(loaded.root), runner.run_plain)


def client_of(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


@pytest.fixture
def models_uri():
    """``models:/`` URIs resolve against the global tracking URI, which each test points at its
    store; mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which tuneval would read."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def load_pyfunc(project: Path, model_id: str):
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    print(f"pyfunc load: {time.perf_counter() - start:.1f} s")  # shown with -s
    return model


def stored_predictions(project: Path, id_col: str, out_col: str) -> dict[str, str]:
    [parquet] = (project / ".tuneval" / "cache" / "predict").glob("*/predictions.parquet")
    table = pq.read_table(parquet).to_pydict()
    return dict(zip(table[id_col], table[out_col], strict=True))


def model_files(project: Path, experiment: str) -> list[Path]:
    return sorted(p for p in (project / "mlruns" / "artifacts" / experiment / "models").rglob("*") if p.is_file())


def test_classification_model_is_logged_once_and_predicts_the_stored_labels(project: Path, models_uri) -> None:
    [result] = run_plain(project)
    client = client_of(project)
    exp = client.get_experiment_by_name("smoke")
    run = client.get_run(result["mlflow_run_id"])
    [model] = client.search_logged_models([exp.experiment_id])
    assert model.source_run_id == run.info.run_id and str(model.status).endswith("READY")
    assert model.tags["tuneval.finetune_key"] == run.data.tags["tuneval.key.finetune"]
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    linked = {m.key: m.value for m in model.metrics}  # the run's test metrics, linked by model_id
    assert linked["test_accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert model.params["train.learning_rate"] == run.data.params["train.learning_rate"]

    # Loaded by URI, it predicts on the benchmark's input column alone: tuneval's own labels.
    pyfunc = load_pyfunc(project, model.model_id)
    rows = [json.loads(line) for line in (project / "data" / "test.jsonl").read_text().splitlines()]
    got = pyfunc.predict(pd.DataFrame({"text": [r["text"] for r in rows]}))
    stored = stored_predictions(project, "example_id", "prediction_name")
    assert got == [stored[str(i)] for i in range(len(rows))]
    assert set(got) == {"negative", "positive"}  # a classifier that learned, not a constant
    assert pyfunc.metadata.get_input_schema().input_names() == ["text"]
    base = pyfunc.unwrap_python_model().meta["base_model"]  # a reference to the base, not a copy
    assert base["source"] == "./models/bert" and len(base["fingerprint"]) >= 16

    # A cached rerun links the model that exists: no new LoggedModel, no file uploaded again.
    files = model_files(project, "smoke")
    [again] = run_plain(project)
    assert set(s["status"] for s in again["stages"].values()) == {"cached"}
    assert [m.model_id for m in client.search_logged_models([exp.experiment_id])] == [model.model_id]
    assert model_files(project, "smoke") == files
    rerun = client.get_run(again["mlflow_run_id"])
    assert [o.model_id for o in rerun.outputs.model_outputs] == [model.model_id]
    assert "model" not in {a.path for a in client.list_artifacts(rerun.info.run_id)}


def test_an_adapter_model_stores_adapter_and_head_only_and_predicts_the_stored_labels(
    project: Path, models_uri
) -> None:
    def lora(raw: dict) -> None:
        raw["pipelines"]["smoke"]["models"] = ["tiny-gpt2"]
        raw["pipelines"]["smoke"]["train"]["adapter"] = {"r": 4, "alpha": 8}

    [result] = run_plain(project, lora)
    client = client_of(project)
    [model] = client.search_logged_models([client.get_experiment_by_name("smoke").experiment_id])
    names = {p.name for p in model_files(project, "smoke")}
    assert "trained.safetensors" in names and "model.safetensors" not in names  # no copy of the base
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["trainable_parameters"] < run.data.metrics["total_parameters"] / 2
    assert run.data.metrics["model_bytes"] > 0
    pyfunc = load_pyfunc(project, model.model_id)
    assert pyfunc.unwrap_python_model().meta["base_model"]["source"] == "./models/gpt2"
    rows = [json.loads(line) for line in (project / "data" / "test.jsonl").read_text().splitlines()]
    got = pyfunc.predict(pd.DataFrame({"text": [r["text"] for r in rows]}))
    stored = stored_predictions(project, "example_id", "prediction_name")
    assert got == [stored[str(i)] for i in range(len(rows))]
    assert len(set(got)) == 2


def test_log_models_false_logs_no_model(project: Path) -> None:
    [result] = run_plain(project, lambda raw: raw.update(tracking={"log_models": False}))
    client = client_of(project)
    exp = client.get_experiment_by_name("smoke")
    assert list(client.search_logged_models([exp.experiment_id])) == []
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert not run.outputs.model_outputs
    assert run.data.params["tracking.log_models"] == "False"


@pytest.fixture
def qa_project(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "models").symlink_to(model_dir, target_is_directory=True)
    write_rows(tmp_path / "data" / "train.jsonl", tiny.qa_rows(160, 1))
    write_rows(tmp_path / "data" / "validation.jsonl", tiny.qa_rows(20, 2))
    write_rows(tmp_path / "data" / "test.jsonl", tiny.qa_rows(30, 3))
    (tmp_path / "pipelines.yaml").write_text(QA_PIPELINES.replace("epochs: 3", "epochs: 2"))
    return tmp_path


def test_qa_model_predicts_the_stored_answer_spans(qa_project: Path, models_uri) -> None:
    [result] = run_plain(qa_project)
    client = client_of(qa_project)
    [out] = client.get_run(result["mlflow_run_id"]).outputs.model_outputs
    pyfunc = load_pyfunc(qa_project, out.model_id)
    rows = [json.loads(line) for line in (qa_project / "data" / "test.jsonl").read_text().splitlines()]
    got = pyfunc.predict(pd.DataFrame({k: [r[k] for r in rows] for k in ("question", "context")}))
    stored = stored_predictions(qa_project, "id", "prediction_text")
    assert got == [stored[r["id"]] for r in rows]
    assert any(got)  # spans, not all empty


@pytest.fixture
def s2s_project(tmp_path: Path, model_dir: Path) -> Path:
    (tmp_path / "models").symlink_to(model_dir, target_is_directory=True)
    write_rows(tmp_path / "data" / "train.jsonl", tiny.summary_rows(120, 1))
    write_rows(tmp_path / "data" / "validation.jsonl", tiny.summary_rows(16, 2))
    write_rows(tmp_path / "data" / "test.jsonl", tiny.summary_rows(20, 3))
    (tmp_path / "pipelines.yaml").write_text(S2S_PIPELINES)
    return tmp_path


@pytest.mark.parametrize("model", ["gpt", "bart"])
def test_seq2seq_model_generates_the_stored_text(s2s_project: Path, model: str, models_uri) -> None:
    [result] = run_plain(s2s_project, lambda raw: raw["pipelines"]["s2s"].update(models=[model]))
    client = client_of(s2s_project)
    [out] = client.get_run(result["mlflow_run_id"]).outputs.model_outputs
    pyfunc = load_pyfunc(s2s_project, out.model_id)
    rows = [json.loads(line) for line in (s2s_project / "data" / "test.jsonl").read_text().splitlines()]
    got = pyfunc.predict(pd.DataFrame({"document": [r["document"] for r in rows]}))
    stored = stored_predictions(s2s_project, "example_id", "prediction")
    assert got == [stored[r["id"]] for r in rows]
    if model == "gpt":  # the tiny BART learns to stop at once: its texts are empty, here and stored
        assert any(text.strip() for text in got)


def test_placeholder_rows_nest_dotted_columns() -> None:
    assert nest({"translation.en": ["a", "b"], "translation.de": ["", ""], "id": ["0", "1"]}) == {
        "translation": [{"en": "a", "de": ""}, {"en": "b", "de": ""}],
        "id": ["0", "1"],
    }
    from pydantic import TypeAdapter

    from tuneval.config.benchmarks import BenchmarkSpec

    bench = TypeAdapter(BenchmarkSpec).validate_python(
        {
            "problem": "seq2seq",
            "data": {"files": {"train": "t", "test": "t"}},
            "columns": {"source": "translation.en", "target": "translation.de"},
        }
    )
    nested = pd.DataFrame({"translation": [{"en": "hello"}, {"en": "world"}]})
    flat = pd.DataFrame({"translation.en": ["hello", "world"]})
    want = {"translation": [{"en": "hello", "de": ""}, {"en": "world", "de": ""}]}
    assert placeholder_rows("seq2seq", bench, {}, nested) == want == placeholder_rows("seq2seq", bench, {}, flat)
    with pytest.raises(ValueError, match="no column 'translation.en'"):
        placeholder_rows("seq2seq", bench, {}, pd.DataFrame({"text": ["x"]}))
