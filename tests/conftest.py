"""Test environment: offline, every store in a temp folder, tiny models built once per session."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="tuneval-tests-"))
# Before anything imports prefect, mlflow or transformers.
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "DO_NOT_TRACK": "true",
        "HF_HOME": str(_TMP / "hf"),
        "PREFECT_HOME": str(_TMP / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("TUNEVAL_CACHE_DIR", None)
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import tiny  # noqa: E402

PIPELINES = """\
models:
  tiny: {source: ./models/bert}
  tiny-gpt2: {source: ./models/gpt2}
benchmarks:
  toy:
    problem: classification
    data: {files: {train: data/train.jsonl, validation: data/validation.jsonl, test: data/test.jsonl}}
    max_length: 32
    metrics: [accuracy, f1]
pipelines:
  smoke:
    models: [tiny]
    benchmarks: [toy]
    seeds: [1]
    train: {epochs: 2, learning_rate: 2e-3, batch_size: 16, warmup_steps: 2, log_every_steps: 2}
"""


@pytest.fixture(scope="session")
def model_dir() -> Path:
    folder = _TMP / "models"
    if not (folder / "bert").exists():
        tiny.bert(folder / "bert")
        tiny.gpt2(folder / "gpt2")
        tiny.gpt2(folder / "gpt2-left", padding_side="left")
        tiny.bart(folder / "bart")
    return folder


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def project(tmp_path: Path, model_dir: Path) -> Path:
    """A self-contained project: pipelines.yaml, toy data, tiny models (symlinked)."""
    (tmp_path / "models").symlink_to(model_dir, target_is_directory=True)
    write_rows(tmp_path / "data" / "train.jsonl", tiny.sentiment_rows(240, 1))
    write_rows(tmp_path / "data" / "validation.jsonl", tiny.sentiment_rows(40, 2))
    write_rows(tmp_path / "data" / "test.jsonl", tiny.sentiment_rows(60, 3))
    (tmp_path / "pipelines.yaml").write_text(PIPELINES)
    return tmp_path
