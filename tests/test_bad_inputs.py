"""The bad-input matrix: every case ends in one `error:` line naming file/field and fix, exit code 2,
no traceback, and nothing lost (artifacts of an earlier run intact; a started MLflow run FAILED)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_rows

from tuneval.cli.main import main
from tuneval.pipeline.store import verify

pytestmark = pytest.mark.integration


def cfg(fn):
    def setup(p: Path) -> None:
        raw = yaml.safe_load((p / "pipelines.yaml").read_text())
        fn(raw)
        (p / "pipelines.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    return setup


def train_override(**kw):
    return cfg(lambda r: r["pipelines"]["smoke"]["train"].update(kw))


def data(split: str, content: bytes):
    return lambda p: (p / "data" / f"{split}.jsonl").write_bytes(content)


def rows(split: str, items: list[dict]):
    return lambda p: write_rows(p / "data" / f"{split}.jsonl", items)


def broken_model(remove: list[str]):
    def setup(p: Path) -> None:
        target = p / "broken-model"
        shutil.copytree(p / "models" / "bert", target)
        for name in remove:
            (target / name).unlink()
        cfg(lambda r: r["models"]["tiny"].update(source="./broken-model"))(p)

    return setup


RUN = ["run"]
# (id, setup, command, parts of the error line, whether the failure happens inside a run)
MATRIX = [
    ("missing config", lambda p: (p / "pipelines.yaml").unlink(), RUN, ["pipelines.yaml", "not found"], False),
    ("config is a folder", lambda p: None, ["check", "--config", "{p}/data"], ["is a folder"], False),
    ("yaml syntax", lambda p: (p / "pipelines.yaml").write_text("models: [x\n"), RUN, ["YAML syntax error"], False),
    (
        "top level not a mapping",
        lambda p: (p / "pipelines.yaml").write_text("- a\n"),
        RUN,
        ["expected a mapping"],
        False,
    ),
    ("config not UTF-8", lambda p: (p / "pipelines.yaml").write_bytes(b"models: \xff\n"), RUN, ["not UTF-8"], False),
    ("unknown key", train_override(lr=1), RUN, ["train.lr", "unknown key"], False),
    ("wrong type", train_override(epochs="two"), RUN, ["train.epochs", "integer"], False),
    ("zero batch size", train_override(batch_size=0), RUN, ["train.batch_size", "greater than 0"], False),
    ("negative learning rate", train_override(learning_rate=-1), RUN, ["learning_rate", "greater than 0"], False),
    ("unknown model", cfg(lambda r: r["pipelines"]["smoke"].update(models=["x"])), RUN, ["unknown model 'x'"], False),
    (
        "unknown benchmark",
        cfg(lambda r: r["pipelines"]["smoke"].update(benchmarks=["y"])),
        RUN,
        ["unknown benchmark 'y'"],
        False,
    ),
    (
        "metric of another problem",
        cfg(lambda r: r["benchmarks"]["toy"].update(metrics=["bleu"])),
        RUN,
        ["metrics[0]"],
        False,
    ),
    (
        "unknown problem",
        cfg(lambda r: r["benchmarks"]["toy"].update(problem="ranking")),
        RUN,
        ["benchmarks.toy"],
        False,
    ),
    (
        "missing data file",
        cfg(lambda r: r["benchmarks"]["toy"]["data"]["files"].update(test="x.jsonl")),
        RUN,
        ["files.test", "not found"],
        False,
    ),
    (
        "data path is a folder",
        cfg(lambda r: r["benchmarks"]["toy"]["data"]["files"].update(test="data")),
        RUN,
        ["files.test", "is a folder"],
        False,
    ),
    (
        "unknown data format",
        lambda p: (
            shutil.copy(p / "data/test.jsonl", p / "data/test.txt"),
            cfg(lambda r: r["benchmarks"]["toy"]["data"]["files"].update(test="data/test.txt"))(p),
        ),
        RUN,
        ["data.format"],
        False,
    ),
    (
        "model path not a model",
        cfg(lambda r: r["models"]["tiny"].update(source="./data")),
        RUN,
        ["no config.json"],
        False,
    ),
    (
        "package not installed",
        cfg(lambda r: r["models"]["tiny"].update(source="package:nope_pkg")),
        RUN,
        ["nope_pkg", "not installed"],
        False,
    ),
    (
        "pipeline name with a separator",
        cfg(lambda r: r["pipelines"].update({"../x": r["pipelines"]["smoke"]})),
        RUN,
        ["invalid name"],
        False,
    ),
    ("duplicate seeds", cfg(lambda r: r["pipelines"]["smoke"].update(seeds=[1, 1])), RUN, ["distinct"], False),
    (
        "cron does not parse",
        cfg(lambda r: r["pipelines"]["smoke"].update(schedule={"cron": "61 * * * *"})),
        RUN,
        ["schedule.cron", "does not parse"],
        False,
    ),
    (
        "unknown timezone",
        cfg(lambda r: r["pipelines"]["smoke"].update(schedule={"cron": "0 3 * * 1", "timezone": "Mars/Olympus"})),
        RUN,
        ["schedule.timezone", "IANA"],
        False,
    ),
    ("unknown pipeline name", lambda p: None, ["run", "nosuch"], ["no pipeline named 'nosuch'"], False),
    ("unknown --force stage", lambda p: None, ["run", "--force", "train"], ["invalid choice: 'train'"], False),
    ("--json folder missing", lambda p: None, ["run", "--json", "{p}/no/such/out.json"], ["does not exist"], False),
    ("unknown command", lambda p: None, ["fit"], ["invalid choice: 'fit'"], False),
    ("column missing", rows("test", [{"review": "a", "label": "positive"}]), RUN, ["column 'text' missing"], True),
    ("label absent from train", rows("test", [{"text": "a", "label": "meh"}]), RUN, ["'meh'", "never occurs"], True),
    (
        "labels of mixed types",
        rows("train", [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}]),
        RUN,
        ["train.jsonl:2", "field 'label'"],
        True,
    ),
    ("empty split", data("validation", b""), RUN, ["validation.jsonl"], True),
    (
        "malformed UTF-8",
        data("test", b'{"text": "caf\xe9", "label": "positive"}\n'),
        RUN,
        ["test.jsonl:1", "UTF-8"],
        True,
    ),
    (
        "invalid JSON line",
        data("test", b'{"text": "a", "label": "positive"}\n{"text"\n'),
        RUN,
        ["test.jsonl:2", "invalid JSON"],
        True,
    ),
    ("model folder missing its weights", broken_model(["model.safetensors"]), RUN, ["cannot load model weights"], True),
    (
        "model folder missing its tokenizer",
        broken_model(["tokenizer.json", "tokenizer_config.json"]),
        RUN,
        ["no tokenizer files", "save_pretrained"],
        True,
    ),
]


@pytest.fixture(scope="module")
def warm_project(tmp_path_factory, model_dir: Path) -> Path:
    """A project that already ran once: its cache and MLflow store are what must not be lost."""
    import tiny

    root = tmp_path_factory.mktemp("warm")
    (root / "models").symlink_to(model_dir, target_is_directory=True)
    write_rows(root / "data" / "train.jsonl", tiny.sentiment_rows(120, 1))
    write_rows(root / "data" / "validation.jsonl", tiny.sentiment_rows(20, 2))
    write_rows(root / "data" / "test.jsonl", tiny.sentiment_rows(30, 3))
    from conftest import PIPELINES

    (root / "pipelines.yaml").write_text(PIPELINES.replace("epochs: 2", "epochs: 1"))
    assert main(["run", "--config", str(root / "pipelines.yaml")]) == 0
    return root


@pytest.mark.parametrize("case,setup,command,parts,in_run", MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input(warm_project: Path, tmp_path: Path, capfd, case, setup, command, parts, in_run) -> None:
    p = tmp_path / "p"
    shutil.copytree(warm_project, p, symlinks=True)
    before = [a.parent for a in (p / ".tuneval" / "cache").glob("*/*/manifest.json")]
    setup(p)
    capfd.readouterr()
    argv = [a.replace("{p}", str(p)) for a in command]
    if "--config" not in argv and argv[0] in ("run", "check"):
        argv += ["--config", str(p / "pipelines.yaml")]
    if argv[0] == "run" and "--json" not in argv:
        argv += ["--json", str(p / "out.json")]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capfd.readouterr()
    assert code == 2, (case, out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for part in parts:
        assert part in errors[0], (part, errors[0])
    assert all(verify(a) for a in before), "an earlier artifact was damaged"
    if in_run:
        result = json.loads((p / "out.json").read_text())["runs"][0]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{p / 'mlruns' / 'mlflow.db'}")
        assert client.get_run(result["mlflow_run_id"]).info.status == "FAILED"


def test_matrix_is_large_enough() -> None:
    assert len({m[0] for m in MATRIX}) >= 25
