"""MLflow logging: the only module that imports mlflow.

Uses ``MlflowClient`` with explicit run ids (no global active run), so concurrent Prefect
threads cannot log into each other's runs, and never lets a logging limit crash training.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from tuneval import __version__
from tuneval.errors import TunevalError

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_KEY = 250
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
SECRET = re.compile(r"(token|secret|password|api[_-]?key|credential)", re.I)


class Tracker:
    def __init__(self, tracking_uri: str, artifact_root: str | None = None):
        import mlflow  # noqa: F401 - fail early if missing
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.artifact_root = artifact_root
        if not tracking_uri.startswith("sqlite:///"):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            return
        db = Path(tracking_uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        # Two processes creating the database at once race in MLflow's schema migration.
        from filelock import FileLock

        with FileLock(str(db) + ".lock"):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            self.client.search_experiments(max_results=1)

    def check(self) -> None:
        """Fail fast (exit 2) when the tracking server cannot be reached."""
        try:
            if self.uri.startswith(("http://", "https://")):
                # One quick probe: MLflow's own client retries with back-off for minutes.
                import urllib.request

                urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=10).close()
            else:
                self.client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001
            raise TunevalError(
                f"MLflow tracking URI {self.uri} cannot be reached ({type(e).__name__}); "
                "start the server, fix MLFLOW_TRACKING_URI, or pass --no-track"
            ) from None

    def experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        try:
            # The MLflow 3 UI reads the kind to open the "Machine learning" (runs) view, not GenAI.
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except Exception:  # noqa: BLE001 - another process created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, experiment: str, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment(experiment), run_name=run_name, tags={**base_tags(), **tags})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:MAX_KEY], _param_value(k, v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._safe(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0, model_id: str | None = None) -> None:
        self.log_series(run_id, [(step, values)], model_id)

    def log_series(self, run_id: str, rows: list[tuple[int, dict[str, float]]], model_id: str | None = None) -> None:
        """``model_id``: the LoggedModel these values score (shown on the model's page too)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k[:MAX_KEY], float(v), now, step, model_id=model_id, run_id=run_id if model_id else None)
            for step, vals in rows
            for k, v in vals.items()
            if isinstance(v, (int, float))
        ]
        for i in range(0, len(items), 1000):
            self._safe(self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._safe(self.client.set_tag, run_id, k[:MAX_KEY], _param_value(k, v))

    def log_artifacts(self, run_id: str, folder: str | Path, path: str | None = None) -> None:
        self._safe(self.client.log_artifacts, run_id, str(folder), path)

    def log_artifact(self, run_id: str, file: str | Path, path: str | None = None) -> None:
        self._safe(self.client.log_artifact, run_id, str(file), path)

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        self._safe(self.client.log_dict, run_id, obj, name)

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, context: str, rows: int) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(
            name=name,
            digest=digest[:36],
            source_type="local" if os.path.exists(source) else "hub",
            source=f'{{"uri": "{source}"}}',
            schema=None,
            profile=f'{{"num_rows": {rows}}}',
        )
        self._safe(self.client.log_inputs, run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", context)])])

    def pipeline_runs(self, pipeline: str) -> list[dict[str, Any]] | None:
        """Every run of a pipeline's experiment as plain data (None when the experiment does not exist):
        run_id, status, start_time (ms), tags, latest metric values."""
        exp = self.client.get_experiment_by_name(pipeline)
        if exp is None:
            return None
        out: list[dict[str, Any]] = []
        token = None
        while True:
            page = self.client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            out += [
                {
                    "run_id": r.info.run_id,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                    "tags": dict(r.data.tags),
                    "metrics": dict(r.data.metrics),
                }
                for r in page
            ]
            token = page.token
            if not token:
                return out

    def run_params(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.params)

    def download(self, run_id: str, path: str, dst: str | Path) -> Path | None:
        """One artifact of a run into ``dst`` (None when the run has no such artifact or it cannot be read)."""
        # A tqdm bar per file on stderr would bury `tuneval report`'s output; the user's own setting wins.
        key, unset = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
        if unset:
            os.environ[key] = "false"
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dst)))
        except Exception as e:  # noqa: BLE001
            log.info("no artifact %s on run %s: %s", path, run_id, str(e).splitlines()[0][:200] if str(e) else e)
            return None
        finally:
            if unset:
                os.environ.pop(key, None)

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def _safe(self, fn: Any, *args: Any, **kw: Any) -> None:
        # Tracking is a record of the work, not the work: a rejected value must not stop a run.
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow %s failed: %s", getattr(fn, "__name__", fn), str(e).splitlines()[0][:200])


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out


def _param_value(key: str, value: Any) -> str:
    if SECRET.search(key):
        return "***"
    text = str(value)
    for secret in _secret_values():
        text = text.replace(secret, "***")
    suffix = "...[truncated]"
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - len(suffix)] + suffix


def masked(key: str, value: Any) -> str:
    """A param or tag value as MLflow gets it: secrets masked, long values truncated."""
    return _param_value(key, value)


def _secret_values() -> list[str]:
    """Values of environment variables named like secrets (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...):
    never written into a param or tag, wherever they appear."""
    return [v for k, v in os.environ.items() if SECRET.search(k) and len(v) >= 6]


def base_tags() -> dict[str, str]:
    return {"tuneval.version": __version__, "tuneval.git_commit": git_commit()}


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
