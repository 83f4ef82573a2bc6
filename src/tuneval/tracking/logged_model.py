"""The fine-tuned model as an MLflow 3 LoggedModel: linked to its run, loadable by URI.

One LoggedModel per finetune artifact, found again by its tag ``tuneval.finetune_key`` (the
finetune cache key): a cached rerun, or another pipeline training the very same thing, links the
model that exists instead of uploading it again. Its artifacts are a pyfunc model
(``pyfunc_model.TunevalModel``) around the artifact's ``model/`` folder as it is, plus
``tuneval_model.json``, which names the base model (source, revision, path, files fingerprint):
for a folder holding only an adapter and a head, that is the base it needs, which is not copied.

Every MLflow call names its run or model (no active run), and any failure is a warning: the
model is a record of the work, not the work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from tuneval import __version__
from tuneval.config.runs import RunSpec
from tuneval.pipeline.store import StageOutcome
from tuneval.settings import Settings

log = logging.getLogger(__name__)

KEY_TAG = "tuneval.finetune_key"
# The logged model's code ("models from code", not a pickle); not imported here: it registers the model.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_code.py")
DEVICE_KINDS = ("cpu", "cuda")


def model_meta(run: RunSpec, settings: Settings, tuned: StageOutcome) -> dict[str, Any]:
    """What the pyfunc needs besides the model folder, and where the model came from."""
    from tuneval.models import loading
    from tuneval.pipeline import keys

    meta = tuned.ref.meta()
    levers = {k: dataclasses.asdict(keys.levers(run, dataclasses.replace(settings, device=k))) for k in DEVICE_KINDS}
    return {
        "tuneval_version": __version__,
        "problem": run.benchmark.problem,
        "benchmark": run.benchmark.model_dump(mode="json"),
        "predict_options": keys.predict_options(run),
        "precision": meta.get("precision", "auto"),
        "eval_batch_size": run.train.eval_batch_size,
        "levers": levers,  # the forward the predict stage uses on each device kind
        "finetune_key": tuned.ref.key,
        "pipeline": run.pipeline,
        "benchmark_name": run.benchmark_name,
        "seed": run.seed,
        "base_model": {
            "name": run.model_name,
            "source": run.model.source,
            "revision": run.model.revision,
            "path": run.model_path,
            "fingerprint": tuned.key_parts.get("upstream", {}).get("model") or loading.files_fingerprint(run.source),
        },
    }


def find(client: Any, key: str) -> Any | None:
    """A READY LoggedModel of this finetune key in any experiment of the store, or None."""
    from mlflow.entities import LoggedModelStatus

    experiments = [e.experiment_id for e in client.search_experiments()]
    for i in range(0, len(experiments), 100):
        found = client.search_logged_models(
            experiment_ids=experiments[i : i + 100], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=10
        )
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        if ready:
            return ready[0]
    return None


def log_or_link(client: Any, run_id: str, run: RunSpec, settings: Settings, tuned: StageOutcome) -> str | None:
    """The LoggedModel of this finetune, logged now or found, linked to ``run_id`` as its output.
    Returns its id (None when logging failed: a warning says why)."""
    from filelock import FileLock
    from mlflow.entities import LoggedModelOutput

    try:
        # Two processes recording the same finetune (a shared cache) would both miss and both upload.
        with FileLock(str(tuned.ref.dir.parent / f"{tuned.ref.key}.mlflow-model.lock")):
            existing = find(client, tuned.ref.key)
            model_id = existing.model_id if existing is not None else _log(client, run_id, run, settings, tuned)
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        return model_id
    except Exception as e:  # noqa: BLE001 - see the module docstring
        log.warning("MLflow: the fine-tuned model was not logged: %s", str(e).splitlines()[0][:200] if str(e) else e)
        return None


def _log(client: Any, run_id: str, run: RunSpec, settings: Settings, tuned: StageOutcome) -> str:
    from mlflow.models import Model

    from tuneval.tracking.client import flatten, masked

    exp = client.get_run(run_id).info.experiment_id
    meta = model_meta(run, settings, tuned)
    params = {k: masked(k, v) for k, v in flatten(run.params()).items()}
    model = client.create_logged_model(
        exp,
        name=f"{run.model_name}__{run.benchmark_name}__seed{run.seed}",
        source_run_id=run_id,
        tags={
            KEY_TAG: tuned.ref.key,
            "tuneval.pipeline": run.pipeline,
            "tuneval.model": run.model_name,
            "tuneval.benchmark": run.benchmark_name,
            "tuneval.seed": str(run.seed),
            "tuneval.base_model": run.model.source,
            "tuneval.base_fingerprint": str(meta["base_model"]["fingerprint"]),
        },
        params=params,
        model_type=f"tuneval-{run.benchmark.problem}",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="tuneval-model-") as tmp:
            meta_file = Path(tmp) / "tuneval_model.json"
            meta_file.write_text(json.dumps(meta, indent=1))
            local = Path(tmp) / "mlflow-model"
            save_pyfunc(local, tuned.ref.dir / "model", meta_file, meta, Model(model_id=model.model_id, run_id=run_id))
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")  # never found again by its key
        raise
    return model.model_id


def save_pyfunc(path: Path, folder: Path, meta_file: Path, meta: dict[str, Any], mlflow_model: Any = None) -> None:
    """The pyfunc model folder (MLmodel, the python model, artifacts) at ``path``."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from tuneval.tracking.pyfunc_model import input_columns

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", c) for c in input_columns(meta["problem"], meta["benchmark"])]),
        outputs=Schema([ColSpec("string")]),
    )
    with warnings.catch_warnings():
        # "no input example": one would make MLflow load and run the model while logging it.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(PYFUNC_CODE),
            artifacts={"model": str(folder), "tuneval": str(meta_file)},
            signature=signature,
            pip_requirements=requirements(),
            metadata={"tuneval_finetune_key": meta["finetune_key"], "base_model": meta["base_model"]["source"]},
            mlflow_model=mlflow_model,
        )


def requirements() -> list[str]:
    """Pinned to what trained the model (tuneval itself is installed from its repository)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("tuneval", "torch", "transformers", "datasets", "mlflow"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out
