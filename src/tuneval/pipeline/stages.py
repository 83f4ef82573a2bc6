"""The five stages as plain functions: load -> prepare -> finetune -> predict -> score.

Each takes the run's spec, the environment settings and its upstream ``ArtifactRef``s, computes
its content key (own spec slice + upstream fingerprints + ``CODE_VERSION``), and returns a
``StageOutcome`` from the artifact store: cached when the key's artifact verifies, built
otherwise. Prefect wraps each in one thin task (``tasks/``); nothing here imports it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from tuneval import accel, metrics, problems
from tuneval.config.runs import RunSpec
from tuneval.data.splits import materialise, open_split, source_identity
from tuneval.models import finetuned, loading
from tuneval.pipeline import keys
from tuneval.pipeline.store import ArtifactRef, StageOutcome, Store, stage_key
from tuneval.reporting import example_ci
from tuneval.settings import Settings

if TYPE_CHECKING:
    from tuneval.problems.base import Runtime

log = logging.getLogger(__name__)


def store_of(settings: Settings) -> Store:
    return Store(settings.cache_dir)


def load(run: RunSpec, settings: Settings, force: bool = False) -> StageOutcome:
    spec = {"data": source_identity(run.benchmark.data)}
    key, parts = stage_key("load", keys.CODE_VERSION["load"], spec, {})
    return store_of(settings).get_or_build("load", key, parts, lambda out: materialise(run.benchmark.data, out), force)


def prepare(run: RunSpec, settings: Settings, loaded: ArtifactRef, force: bool = False) -> StageOutcome:
    t = run.train
    caps = {"train": t.max_train_samples, "validation": t.max_eval_samples, "test": t.max_test_samples}
    spec = {
        # generation settings only matter from predict on: changing them must not retrain.
        "benchmark": run.benchmark.model_dump(mode="json", exclude={"data", "metrics", "generation"}),
        "caps": {**caps, "data_seed": t.data_seed},
    }
    upstream = {
        "load": loaded.fingerprint,
        "tokenizer": loading.files_fingerprint(run.source, None, loading.TOKENIZER_FILES),
    }
    key, parts = stage_key("prepare", keys.CODE_VERSION["prepare"], spec, upstream)

    def build(out: Path) -> dict[str, Any]:
        problem = problems.get(run.benchmark.problem)
        split_meta = loaded.meta()["splits"]
        splits = {s: open_split(loaded.path, s) for s in split_meta}
        info = problem.check_data(splits, run.benchmark, {s: m["source"] for s, m in split_meta.items()})
        tokenizer = loading.load_tokenizer(run.source)
        summary = {}
        for split, ds in splits.items():
            cap = caps.get(split)
            if cap and cap < len(ds):
                # A fixed data_seed: every seed and every model sees the same subset.
                ds = ds.shuffle(seed=t.data_seed, keep_in_memory=True).select(range(cap), keep_in_memory=True)
            tok = problem.prepare_split(ds, tokenizer, run.benchmark, info, split)
            tok.save_to_disk(str(out / split))
            lengths = [len(x) for x in tok["input_ids"]]
            summary[split] = {
                "examples": len(ds),
                "rows": len(tok),
                "mean_tokens": sum(lengths) / len(lengths),
                "max_tokens": max(lengths),
                "truncated": sum(n >= _max_len(run) for n in lengths),
            }
        return {"info": info, "splits": summary}

    return store_of(settings).get_or_build("prepare", key, parts, build, force)


def has_intrinsic(run: RunSpec) -> bool:
    """Only problems that score the pre-trained model itself (seq2seq perplexity) have the stage."""
    return problems.has_intrinsic(run.benchmark.problem)


def intrinsic(
    run: RunSpec, settings: Settings, prepared: ArtifactRef, force: bool = False, progress: bool = False
) -> StageOutcome:
    """The pre-trained model's own scores on the test split (seq2seq: perplexity of the targets).

    A stage of its own, keyed by the model's files and the prepared data only: it is computed
    once per model x benchmark, whatever the seeds and recipes, and survives retraining.
    """
    spec = {"model": run.model.model_dump(mode="json", exclude={"source", "revision"}), "split": "test"}
    upstream = {"prepare": prepared.fingerprint, "model": keys.model_fingerprint(run)}
    key, parts = stage_key("intrinsic", keys.CODE_VERSION["intrinsic"], spec, upstream)

    def build(out: Path) -> dict[str, Any]:
        from tuneval.training.device import seed_everything

        problem = problems.get(run.benchmark.problem)
        info = prepared.meta()["info"]
        rt = runtime(run, settings, run.train.precision, progress)
        seed_everything(0)  # newly initialised weights (BERT2BERT cross-attention) are fixed
        tokenizer = loading.load_tokenizer(run.source)
        model = problem.build_model(run, tokenizer, info)
        results = problem.intrinsic(model, tokenizer, open_split(prepared.path, "test"), info, rt)
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
        return {"metrics": results}

    return store_of(settings).get_or_build("intrinsic", key, parts, build, force)


def _max_len(run: RunSpec) -> int:
    return int(getattr(run.benchmark, "max_length", 0) or 1 << 30)


def runtime(run: RunSpec, settings: Settings, precision: str, progress: bool) -> Runtime:
    from tuneval.problems.base import Runtime
    from tuneval.training.device import resolve_device, resolve_precision

    device = resolve_device(settings.device)
    return Runtime(
        device=device,
        precision=resolve_precision(precision, device),
        batch_size=run.train.eval_batch_size,
        progress=progress,
    )


def predict(
    run: RunSpec,
    settings: Settings,
    tuned: ArtifactRef,
    prepared: ArtifactRef,
    force: bool = False,
    progress: bool = True,
) -> StageOutcome:
    options = keys.predict_options(run)
    key, parts = stage_key(
        "predict",
        keys.CODE_VERSION["predict"],
        {"split": "test", **options},
        {"finetune": tuned.fingerprint, "prepare": prepared.fingerprint},
    )

    def build(out: Path) -> dict[str, Any]:
        problem = problems.get(run.benchmark.problem)
        model, tokenizer, info = finetuned.load(problem, tuned.dir / "model")
        model = accel.apply(model, keys.levers(run, settings))  # predict with the forward it trained with
        info = {**info, **options}
        rt = runtime(run, settings, tuned.meta()["precision"], progress)
        table = problem.predict(model, tokenizer, open_split(prepared.path, "test"), info, rt)
        write_parquet(table, out / "predictions.parquet")
        return {"rows": len(next(iter(table.values()))), "split": "test"}

    return store_of(settings).get_or_build("predict", key, parts, build, force)


def score(
    run: RunSpec, settings: Settings, predicted: ArtifactRef, prepared: ArtifactRef, force: bool = False
) -> StageOutcome:
    names = list(run.benchmark.metrics)
    spec = {"metrics": names, "settings": {n: metrics.settings(n, run.benchmark.problem) for n in names}}
    key, parts = stage_key(
        "score", keys.CODE_VERSION["score"], spec, {"predict": predicted.fingerprint, "prepare": prepared.fingerprint}
    )

    def build(out: Path) -> dict[str, Any]:
        problem = problems.get(run.benchmark.problem)
        table = pq.read_table(predicted.dir / "predictions.parquet").to_pydict()
        info = prepared.meta()["info"]
        results, report = problem.score(table, names, info)
        # One seed has no spread over seeds: its CI is a bootstrap over the test examples.
        cis = example_ci.bootstrap_cis(run.benchmark.problem, [n for n in names if n in results], table, info)
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "ci.json").write_text(json.dumps(cis, indent=1))
        return {"metrics": results, "settings": spec["settings"], "ci": cis}

    return store_of(settings).get_or_build("score", key, parts, build, force)


def write_parquet(table: dict[str, list[Any]], path: Path) -> None:
    pq.write_table(pa.table(table), str(path))
