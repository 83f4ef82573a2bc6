"""Config validation: every problem at once, each naming file, line, YAML path and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneval.config import load_config, resolve_runs
from tuneval.config.schema import Config
from tuneval.config.train import TrainSettings
from tuneval.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def edit(project: Path, fn) -> Path:
    raw = yaml.safe_load((project / "pipelines.yaml").read_text())
    fn(raw)
    (project / "pipelines.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return project / "pipelines.yaml"


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


# (case, mutation of the raw config, substrings the single problem line must contain)
CASES = [
    (
        "unknown key",
        lambda r: r["pipelines"]["smoke"]["train"].update(lr=1),
        ["pipelines.smoke.train.lr", "unknown key", "learning_rate"],
    ),
    ("unknown top-level key", lambda r: r.update(pipeline={}), ["pipeline", "unknown key"]),
    (
        "wrong type",
        lambda r: r["pipelines"]["smoke"]["train"].update(epochs="three"),
        ["pipelines.smoke.train.epochs", "integer", "'three'"],
    ),
    (
        "zero where positive",
        lambda r: r["pipelines"]["smoke"]["train"].update(batch_size=0),
        ["pipelines.smoke.train.batch_size", "greater than 0"],
    ),
    (
        "negative learning rate",
        lambda r: r["pipelines"]["smoke"]["train"].update(learning_rate=-1e-5),
        ["learning_rate", "greater than 0"],
    ),
    (
        "unknown model",
        lambda r: r["pipelines"]["smoke"].update(models=["tinny"]),
        ["pipelines.smoke.models[0]", "unknown model 'tinny'", "did you mean 'tiny'"],
    ),
    (
        "unknown benchmark",
        lambda r: r["pipelines"]["smoke"].update(benchmarks=["nope"]),
        ["pipelines.smoke.benchmarks[0]", "unknown benchmark 'nope'", "declared: toy"],
    ),
    (
        "metric of another problem",
        lambda r: r["benchmarks"]["toy"].update(metrics=["bleu"]),
        ["benchmarks.toy.metrics[0]", "'accuracy'", "'bleu'"],
    ),
    (
        "unknown problem",
        lambda r: r["benchmarks"]["toy"].update(problem="regression"),
        ["benchmarks.toy", "classification"],
    ),
    (
        "missing data file",
        lambda r: r["benchmarks"]["toy"]["data"]["files"].update(test="data/nope.jsonl"),
        ["benchmarks.toy.data.files.test", "not found", "nope.jsonl"],
    ),
    (
        "data path is a folder",
        lambda r: r["benchmarks"]["toy"]["data"]["files"].update(test="data"),
        ["benchmarks.toy.data.files.test", "is a folder"],
    ),
    (
        "model path not a model",
        lambda r: r["models"]["tiny"].update(source="./data"),
        ["models.tiny.source", "not a model folder (no config.json)"],
    ),
    (
        "package not installed",
        lambda r: r["models"]["tiny"].update(source="package:no_such_pkg_xyz"),
        ["models.tiny.source", "no_such_pkg_xyz", "not installed"],
    ),
    (
        "pipeline name with a path separator",
        lambda r: r["pipelines"].update({"a/b": r["pipelines"]["smoke"]}),
        ["pipelines.a/b", "invalid name"],
    ),
    (
        "both files and hub",
        lambda r: r["benchmarks"]["toy"]["data"].update(hub="glue"),
        ["benchmarks.toy.data", "exactly one of 'files'"],
    ),
    ("duplicate seeds", lambda r: r["pipelines"]["smoke"].update(seeds=[1, 1]), ["pipelines.smoke.seeds", "distinct"]),
    (
        "bad trainable",
        lambda r: r["pipelines"]["smoke"]["train"].update(trainable={"top_k": 0}),
        ["pipelines.smoke.train.trainable", "greater than 0"],
    ),
]


@pytest.mark.parametrize("case,mutate,expected", CASES, ids=[c[0] for c in CASES])
def test_each_bad_config_is_one_clear_line(project: Path, case, mutate, expected) -> None:
    problems = errors_of(edit(project, mutate))
    assert len(problems) == 1, problems
    line = problems[0]
    assert line.startswith("pipelines.yaml:"), line
    for part in expected:
        assert part in line, f"{case}: {part!r} not in {line!r}"


def test_every_error_reported_at_once(project: Path) -> None:
    def many(r):
        r["pipelines"]["smoke"]["train"].update(lr=1, epochs=0)
        r["pipelines"]["smoke"]["models"] = ["ghost"]
        r["benchmarks"]["toy"]["metrics"] = ["rouge1"]

    problems = errors_of(edit(project, many))
    joined = "\n".join(problems)
    assert len(problems) == 4, problems
    for part in ("train.lr", "train.epochs", "unknown model 'ghost'", "metrics[0]"):
        assert part in joined


def test_error_lines_point_at_the_yaml_line(project: Path) -> None:
    path = project / "pipelines.yaml"
    text = path.read_text().replace("batch_size: 16", "batch_size: -4")
    path.write_text(text)
    line_no = next(i for i, s in enumerate(text.splitlines(), 1) if "batch_size" in s)
    [problem] = errors_of(path)
    assert problem.startswith(f"pipelines.yaml:{line_no}:"), problem


def test_yaml_syntax_error_names_line(project: Path) -> None:
    path = project / "pipelines.yaml"
    path.write_text("models:\n  tiny: {source: ./models/bert\nbenchmarks: {}\n")
    [problem] = errors_of(path)
    assert "YAML syntax error" in problem and "pipelines.yaml:3:" in problem


def test_missing_config_file(tmp_path: Path) -> None:
    [problem] = errors_of(tmp_path / "nope.yaml")
    assert "config file not found" in problem and "--config" in problem


def test_numbers_written_as_yaml_strings_are_accepted(project: Path) -> None:
    # PyYAML reads 3e-5 (no dot) as the string '3e-5'.
    text = (project / "pipelines.yaml").read_text().replace("learning_rate: 2e-3", "learning_rate: 3e-5")
    (project / "pipelines.yaml").write_text(text)
    assert yaml.safe_load(text)["pipelines"]["smoke"]["train"]["learning_rate"] == "3e-5"
    [run] = resolve_runs(load_config(project / "pipelines.yaml"))
    assert run.train.learning_rate == pytest.approx(3e-5)


def test_defaults_then_pipeline_overrides(project: Path) -> None:
    path = edit(project, lambda r: r.update(defaults={"train": {"epochs": 7, "weight_decay": 0.5}}))
    [run] = resolve_runs(load_config(path))
    assert run.train.epochs == 2  # pipeline wins
    assert run.train.weight_decay == 0.5  # default applies
    assert run.train.max_grad_norm == TrainSettings().max_grad_norm  # schema default


def test_runs_fan_out_and_paths_resolve_against_config_folder(project: Path, tmp_path: Path, monkeypatch) -> None:
    path = edit(project, lambda r: r["pipelines"]["smoke"].update(seeds=[1, 2, 3], models=["tiny", "tiny-gpt2"]))
    monkeypatch.chdir(tmp_path.parent)  # relative paths must not depend on the working directory
    runs = resolve_runs(load_config(path))
    assert len(runs) == 6
    assert {r.seed for r in runs} == {1, 2, 3}
    assert all(Path(f).is_absolute() and Path(f).exists() for f in runs[0].benchmark.data.files.values())


def test_unknown_pipeline_name(project: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_runs(load_config(project / "pipelines.yaml"), ["smoek"])
    assert "no pipeline named 'smoek'" in str(e.value) and "did you mean 'smoke'" in str(e.value)


def test_hub_model_offline_is_reported_before_running(project: Path) -> None:
    path = edit(project, lambda r: r["models"]["tiny"].update(source="some-org/not-cached-model"))
    with pytest.raises(ConfigError) as e:
        resolve_runs(load_config(path))
    assert "models.tiny.source" in str(e.value) and "offline" in str(e.value)


def test_shipped_pipelines_yaml_is_valid() -> None:
    loaded = load_config(ROOT / "pipelines.yaml")
    assert "demo" in loaded.config.pipelines
    assert loaded.config.benchmarks["sst2"].data.hub  # the networked form is declared too


def test_json_schema_export() -> None:
    schema = Config.model_json_schema()
    json.dumps(schema)
    assert {"models", "benchmarks", "pipelines"} <= set(schema["properties"])
