"""What the MLflow UI shows first: tuneval's saved runs view, experiment tags, one-line run notes
with the report's numbers. (The browser test checks that MLflow's UI honours them.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_logged_model import client_of, run_plain

from tuneval.cli.main import main
from tuneval.config import load_config
from tuneval.tracking import ui_view

ROOT = Path(__file__).resolve().parents[1]


def edited(project: Path, edit) -> Path:
    cfg = project / "pipelines.yaml"
    raw = yaml.safe_load(cfg.read_text())
    edit(raw)
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_the_view_sorts_by_the_primary_metric_and_shows_it_first(project: Path) -> None:
    demo = ui_view.pipeline_view(load_config(ROOT / "pipelines.yaml").config, "demo")
    assert (demo.primary, demo.ascending) == ("test_accuracy", False)
    state = ui_view.view_state(demo)
    assert state["orderByKey"] == "metrics.`test_accuracy`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:3] == ["metrics.`test_accuracy`", "attributes.`Models`", "metrics.`test_f1`"]
    assert state["selectedColumns"][-1] == "attributes.`Description`" == state["columnOrder"][-1]

    def seeds_and_perplexity_first(raw: dict) -> None:
        raw["pipelines"]["smoke"]["seeds"] = [1, 2]
        raw["benchmarks"]["toy"]["metrics"] = ["f1", "accuracy"]

    config = load_config(edited(project, seeds_and_perplexity_first)).config
    view = ui_view.pipeline_view(config, "smoke")
    assert view.primary == "test_f1_mean" and view.metrics[:2] == ("test_f1_mean", "test_f1")
    lower = ui_view.PipelineView("p", "test_perplexity_mean", ("test_perplexity_mean",))
    assert lower.ascending and ui_view.view_state(lower)["orderByAsc"] is True
    url = ui_view.runs_url("http://127.0.0.1:5000/", "7")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=tuneval"


@pytest.mark.integration
def test_notes_carry_the_reports_numbers_and_models_are_shared_across_pipelines(project: Path, capfd) -> None:
    def two_pipelines(raw: dict) -> None:
        raw["pipelines"]["seeds"] = {**raw["pipelines"]["smoke"], "seeds": [1, 2]}

    cfg = edited(project, two_pipelines)
    results = run_plain(project)
    client = client_of(project)
    by_name = {}
    for name in ("smoke", "seeds"):
        exp = client.get_experiment_by_name(name)
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # "Machine learning" in the UI
        by_name[name] = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    single, parent = by_name["smoke"]["tiny__toy__seed1"], by_name["seeds"]["tiny__toy"]

    # Seed 1 is trained once for both pipelines: one LoggedModel, linked from both runs.
    experiments = [client.get_experiment_by_name(n).experiment_id for n in ("smoke", "seeds")]
    assert len(client.search_logged_models(experiments)) == 2  # seeds 1 and 2
    seed1 = by_name["seeds"]["tiny__toy__seed1"]
    assert [o.model_id for o in seed1.outputs.model_outputs] == [o.model_id for o in single.outputs.model_outputs]

    capfd.readouterr()
    assert main(["report", "--config", str(cfg), "--out", str(project / "reports")]) == 0
    report = capfd.readouterr().out
    for run in (single, parent):
        note = run.data.tags["mlflow.note.content"]
        cells = dict(re.findall(r"(accuracy|f1) (\S+ ± \S+)", note))
        assert set(cells) == {"accuracy", "f1"}, note
        for cell in cells.values():
            assert cell in report, (cell, report)
    assert "over 2 seeds" in parent.data.tags["mlflow.note.content"]
    mean = sum(r["metrics"]["accuracy"] for r in results if r["pipeline"] == "seeds") / 2
    assert parent.data.metrics["test_accuracy_mean"] == pytest.approx(mean)


@pytest.mark.integration
def test_prepare_tags_experiments_once_and_links_only_those_with_runs(project: Path) -> None:
    run_plain(project)
    cfg = edited(project, lambda raw: raw["pipelines"].update(later=raw["pipelines"]["smoke"]))
    client, config = client_of(project), load_config(cfg).config
    links = dict(ui_view.prepare(client, config, ["smoke", "later"], "http://127.0.0.1:5999"))
    exp = client.get_experiment_by_name("smoke")
    assert links == {"smoke": ui_view.runs_url("http://127.0.0.1:5999", exp.experiment_id), "later": None}
    envelope = json.loads(exp.tags[ui_view.VIEW_TAG])
    assert envelope["name"] == "tuneval: highest test_accuracy first"
    assert json.loads(envelope["state"]) == ui_view.view_state(ui_view.pipeline_view(config, "smoke"))
    ui_view.prepare(client, config, ["smoke"], "http://127.0.0.1:5999")  # unchanged config: tag kept as it is
    assert client.get_experiment_by_name("smoke").tags[ui_view.VIEW_TAG] == exp.tags[ui_view.VIEW_TAG]
