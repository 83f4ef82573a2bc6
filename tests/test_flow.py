"""Integration: the whole Prefect flow on a tiny model, through the CLI, with MLflow on SQLite."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tuneval.cli.main import main

pytestmark = pytest.mark.integration


def run_cli(project: Path, *args: str) -> tuple[int, dict]:
    out = project / "results.json"
    out.unlink(missing_ok=True)
    code = main(["run", "--config", str(project / "pipelines.yaml"), "--json", str(out), *args])
    return code, (json.loads(out.read_text()) if out.exists() else {})


def stage_statuses(result: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in result["runs"][0]["stages"].items()}


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


def artifacts_of(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_run_twice_second_all_cached_and_mlflow_record(project: Path, capfd) -> None:
    code, first = run_cli(project)
    assert code == 0, capfd.readouterr().err
    assert set(stage_statuses(first).values()) == {"ran"}
    run = first["runs"][0]
    assert (run["pipeline"], run["model"], run["benchmark"], run["seed"]) == ("smoke", "tiny", "toy", 1)
    assert run["metrics"]["accuracy"] >= 0.9 and "f1" in run["metrics"]
    assert all(s["seconds"] is not None for s in run["stages"].values())

    code, second = run_cli(project)
    assert code == 0
    assert set(stage_statuses(second).values()) == {"cached"}
    assert second["runs"][0]["metrics"] == run["metrics"]
    assert "accuracy" in capfd.readouterr().out  # the results table

    # The MLflow record, read back through the client.
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    r = client.get_run(run["mlflow_run_id"])
    assert r.data.params["train.learning_rate"] == "0.002"
    assert r.data.params["seed"] == "1" and r.data.params["benchmark.problem"] == "classification"
    assert r.data.params["metric_settings.f1.average"] == "macro"
    assert r.data.params["model.trust_remote_code"] == "False"  # off unless a model sets it
    assert r.data.metrics["test_accuracy"] == pytest.approx(run["metrics"]["accuracy"])
    assert "val_accuracy" in r.data.metrics
    loss_curve = client.get_metric_history(r.info.run_id, "train_loss")
    assert len(loss_curve) >= 3 and loss_curve[-1].value < loss_curve[0].value
    assert len(client.get_metric_history(r.info.run_id, "learning_rate")) == len(loss_curve)
    assert r.data.tags["tuneval.stage.finetune"] == "ran" and r.data.tags["tuneval.device"] == "cpu"
    assert r.data.tags["prefect.flow_run_id"] and r.data.tags["tuneval.orchestrator"] == "prefect"
    # Nothing to build: recorded as fully (params, curves, artifacts) but without starting Prefect.
    fast = client.get_run(second["runs"][0]["mlflow_run_id"])
    assert fast.data.tags["tuneval.orchestrator"] == "none" and not fast.data.tags["prefect.flow_run_id"]
    assert fast.data.params == r.data.params
    assert {a.path for a in client.list_artifacts(fast.info.run_id)} == artifacts_of(client, r.info.run_id)
    assert r.inputs.dataset_inputs and {d.dataset.name for d in r.inputs.dataset_inputs} >= {"toy/train", "toy/test"}
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"predictions", "scores", "metric_settings.json", "cache_keys"} <= artifacts
    # The fine-tuned model is the run's LoggedModel (tests/test_logged_model.py), not a run artifact.
    [out] = r.outputs.model_outputs
    model_files = {Path(a.path).name for a in client.list_logged_model_artifacts(out.model_id, "artifacts/model")}
    assert {"head.safetensors", "tuneval_head.json", "backbone"} <= model_files
    # A damaged cached artifact is reported in one warning line and rebuilt, never used.
    [parquet] = (project / ".tuneval" / "cache" / "predict").glob("*/predictions.parquet")
    parquet.write_bytes(parquet.read_bytes()[:-20])
    records: list[logging.LogRecord] = []
    spy = logging.Handler(logging.WARNING)
    spy.emit = records.append  # Prefect reconfigures logging when a flow starts: attach directly
    logging.getLogger("tuneval").addHandler(spy)
    try:
        code, third = run_cli(project)
    finally:
        logging.getLogger("tuneval").removeHandler(spy)
    assert code == 0 and stage_statuses(third)["predict"] == "ran" and stage_statuses(third)["finetune"] == "cached"
    warnings = [r.getMessage() for r in records if "corrupted" in r.getMessage()]
    assert len(warnings) == 1 and "predict" in warnings[0] and "\n" not in warnings[0]
    assert third["runs"][0]["metrics"] == run["metrics"]

    cached = client.get_run(second["runs"][0]["mlflow_run_id"])
    assert cached.data.tags["tuneval.stage.finetune"] == "cached"
    assert len(client.get_metric_history(cached.info.run_id, "train_loss")) == len(loss_curve)

    # One seed: a bootstrap CI over the test examples; each `tuneval run` is one invocation, compared
    # with the previous one (same scores: no regression) and reported through `tuneval report`.
    m = r.data.metrics
    assert m["test_accuracy_ci_low"] <= m["test_accuracy"] <= m["test_accuracy_ci_high"] and "test_f1_ci_low" in m
    assert cached.data.tags["tuneval.invocation"] != r.data.tags["tuneval.invocation"]
    assert (
        cached.data.tags["tuneval.regression"] == "false" and cached.data.tags["tuneval.compared_with"] == r.info.run_id
    )
    report_dir = project / "reports"
    assert (
        main(["report", "--config", str(project / "pipelines.yaml"), "--out", str(report_dir), "--fail-on-regression"])
        == 0
    )
    assert "No regression since the previous run." in (report_dir / "smoke" / "report.md").read_text()

    # --always-flow: a fully cached invocation still goes through Prefect when asked.
    code, fourth = run_cli(project, "--always-flow")
    assert code == 0 and set(stage_statuses(fourth).values()) == {"cached"}
    flowed = client.get_run(fourth["runs"][0]["mlflow_run_id"])
    assert flowed.data.tags["tuneval.orchestrator"] == "prefect" and flowed.data.tags["prefect.flow_run_id"]


def test_finetune_fails_then_rerun_reuses_load_and_prepare(project: Path, tmp_path: Path, capfd) -> None:
    # A model folder whose weights are missing: the tokenizer loads (prepare works), finetune cannot.
    broken = tmp_path / "broken-model"
    shutil.copytree(project / "models" / "bert", broken)
    weights = broken / "model.safetensors"
    kept = tmp_path / "weights.bak"
    weights.rename(kept)
    cfg = project / "pipelines.yaml"
    cfg.write_text(cfg.read_text().replace("source: ./models/bert", f"source: {broken}"))

    code, failed = run_cli(project)
    err = capfd.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert "cannot load model weights" in err
    assert stage_statuses(failed) == {"load": "ran", "prepare": "ran", "finetune": "failed"}
    client = mlflow_client(project)
    assert client.get_run(failed["runs"][0]["mlflow_run_id"]).info.status == "FAILED"

    kept.rename(weights)
    code, fixed = run_cli(project)
    assert code == 0
    assert stage_statuses(fixed) == {
        "load": "cached",
        "prepare": "cached",
        "finetune": "ran",
        "predict": "ran",
        "score": "ran",
    }

    code, forced = run_cli(project, "--force", "predict")
    assert code == 0
    assert stage_statuses(forced) == {
        "load": "cached",
        "prepare": "cached",
        "finetune": "cached",
        "predict": "ran",
        "score": "ran",
    }


def test_data_error_at_run_time_is_one_line_exit_2(project: Path, capfd) -> None:
    (project / "data" / "test.jsonl").write_text(json.dumps({"text": "a", "label": "neutral"}) + "\n")
    code, result = run_cli(project)
    captured = capfd.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err + captured.out
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "'neutral'" in error_lines[0] and "test.jsonl" in error_lines[0]
    assert stage_statuses(result) == {"load": "ran", "prepare": "failed"}
    run = mlflow_client(project).get_run(result["runs"][0]["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["tuneval.failed_stage"] == "prepare"


def test_several_seeds_nest_under_a_parent_with_statistics(project: Path, capfd) -> None:
    cfg = project / "pipelines.yaml"
    cfg.write_text(cfg.read_text().replace("seeds: [1]", "seeds: [1, 2]").replace("epochs: 2", "epochs: 1"))
    code, result = run_cli(project)
    assert code == 0
    assert [r["seed"] for r in result["runs"]] == [1, 2]
    [summary] = result["summaries"]
    accs = [r["metrics"]["accuracy"] for r in result["runs"]]
    assert summary["metrics"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert "over seeds" in capfd.readouterr().out

    client = mlflow_client(project)
    exp = client.get_experiment_by_name("smoke")
    [parent] = client.search_runs([exp.experiment_id], "tags.`tuneval.kind` = 'seed-group'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_seeds"] == 2
    assert parent.data.metrics["test_accuracy_mean"] == pytest.approx(sum(accs) / 2)
    assert "test_accuracy_ci_low" in parent.data.metrics
    children = [client.get_run(r["mlflow_run_id"]) for r in result["runs"]]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
