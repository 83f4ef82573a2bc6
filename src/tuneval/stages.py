"""The five stages as plain functions: load -> prepare -> finetune -> predict -> score.

Each takes the run's spec, the environment settings and its upstream ``ArtifactRef``s, computes
its content key (own spec slice + upstream fingerprints + ``CODE_VERSION``), and returns a
``StageOutcome`` from the artifact store: cached when the key's artifact verifies, built
otherwise. Prefect wraps each in one thin task (``tasks/``); nothing here imports it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from tuneval import data, example_ci, metrics, models, problems
from tuneval.artifacts import ArtifactRef, StageOutcome, Store, stage_key
from tuneval.config.runs import RunSpec
from tuneval.settings import Settings

if TYPE_CHECKING:
    from tuneval.distributed import Dist
    from tuneval.problems.base import Runtime

log = logging.getLogger(__name__)

ORDER = ("load", "prepare", "intrinsic", "finetune", "predict", "score")
# Train settings that do not change what is learned (resume is exact), and the data caps that
# the prepare stage's key already holds: both stay out of the finetune key.
# ``compile`` and ``devices`` are not among them: with dropout on, compiled dropout and each rank
# draw other masks, so the result is another sample of the recipe (equal within tolerance only
# with dropout off: tests/test_training.py, tests/test_ddp.py).
SPEED_ONLY = {"eval_batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"}
CAPS = {"max_train_samples", "max_eval_samples", "max_test_samples", "data_seed"}
# Bump a stage's number when its behaviour changes: Prefect's TASK_SOURCE sees only the thin
# task wrapper, never this code, so the version is explicit.
# tuneval's encoder kernels (packed_bert, native/cpu_fused.c) draw their own CPU dropout masks:
# a change to how they draw them (2: hashed per element in the fused kernels) is another result.
ENCODER_KERNELS_VERSION = 2
# finetune 4: clipping folded into fused AdamW (training.clipped_step), the word embedding stepped
# by row_adamw, the fused linear + GELU kernel: rounding-level changes, still another result.
CODE_VERSION = {"load": 1, "prepare": 2, "intrinsic": 1, "finetune": 4, "predict": 2, "score": 3}


def _store(settings: Settings) -> Store:
    return Store(settings.cache_dir)


def load(run: RunSpec, settings: Settings, force: bool = False) -> StageOutcome:
    spec = {"data": data.source_identity(run.benchmark.data)}
    key, parts = stage_key("load", CODE_VERSION["load"], spec, {})
    return _store(settings).get_or_build(
        "load", key, parts, lambda out: data.materialise(run.benchmark.data, out), force
    )


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
        "tokenizer": models.files_fingerprint(run.model_path, run.model.revision, models.TOKENIZER_FILES),
    }
    key, parts = stage_key("prepare", CODE_VERSION["prepare"], spec, upstream)

    def build(out: Path) -> dict[str, Any]:
        problem = problems.get(run.benchmark.problem)
        split_meta = loaded.meta()["splits"]
        splits = {s: data.open_split(loaded.path, s) for s in split_meta}
        info = problem.check_data(splits, run.benchmark, {s: m["source"] for s, m in split_meta.items()})
        tokenizer = models.load_tokenizer(run.model_path, run.model.revision, run.model.trust_remote_code)
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

    return _store(settings).get_or_build("prepare", key, parts, build, force)


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
    upstream = {"prepare": prepared.fingerprint, "model": models.files_fingerprint(run.model_path, run.model.revision)}
    key, parts = stage_key("intrinsic", CODE_VERSION["intrinsic"], spec, upstream)

    def build(out: Path) -> dict[str, Any]:
        from tuneval import training

        problem = problems.get(run.benchmark.problem)
        info = prepared.meta()["info"]
        rt = _runtime(run, settings, run.train.precision, progress)
        training.seed_everything(0)  # newly initialised weights (BERT2BERT cross-attention) are fixed
        tokenizer = models.load_tokenizer(run.model_path, run.model.revision, run.model.trust_remote_code)
        model = problem.build_model(run, tokenizer, info)
        results = problem.intrinsic(model, tokenizer, data.open_split(prepared.path, "test"), info, rt)
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
        return {"metrics": results}

    return _store(settings).get_or_build("intrinsic", key, parts, build, force)


def _max_len(run: RunSpec) -> int:
    return int(getattr(run.benchmark, "max_length", 0) or 1 << 30)


def _runtime(run: RunSpec, settings: Settings, precision: str, progress: bool) -> Runtime:
    from tuneval import training
    from tuneval.problems.base import Runtime

    device = training.resolve_device(settings.device)
    return Runtime(
        device=device,
        precision=training.resolve_precision(precision, device),
        batch_size=run.train.eval_batch_size,
        progress=progress,
    )


def hashed_dropout(run: RunSpec, settings: Settings) -> bool:
    """Whether this run draws dropout masks by hash (``hash_dropout``): whenever its seeds may be
    fused (``train.fuse_seeds`` true, or auto on CUDA), so a solo run and a fused one agree."""
    fuse = run.train.fuse_seeds
    if fuse is not None:
        return fuse
    if settings.device != "auto":
        return settings.device.startswith("cuda")
    # auto: an NVIDIA driver is visible. Not torch.cuda: a cached rerun must not import torch,
    # and this decides a cache key, so it must answer the same with or without torch loaded.
    return Path("/proc/driver/nvidia/version").exists() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def finetune_key(run: RunSpec, settings: Settings, prepared: ArtifactRef) -> tuple[str, dict[str, Any]]:
    # Speed-only knobs stay out of the key: they do not change what is learned. fuse_seeds too:
    # fused and solo training agree to floating-point tolerance (tests/test_fused.py).
    exclude = SPEED_ONLY | CAPS | {"fuse_seeds", "devices"}
    if run.benchmark.problem != "classification":  # only classification has tuneval's encoder kernels
        exclude = exclude | {"encoder_kernels"}
    recipe = run.train.model_dump(mode="json", exclude=exclude)
    spec: dict[str, Any] = {
        "train": recipe,
        "seed": run.seed,
        "model": run.model.model_dump(mode="json", exclude={"source", "revision"}),
    }
    if run.train.devices > 1:  # only then: one-process keys stay what they were before the setting
        spec["devices"] = run.train.devices
    if hashed_dropout(run, settings):
        spec["dropout_masks"] = "hash"  # other masks than torch's dropout: another result
    elif run.benchmark.problem == "classification" and run.train.encoder_kernels == "tuneval":
        spec["encoder_kernels_version"] = ENCODER_KERNELS_VERSION
    upstream = {"prepare": prepared.fingerprint, "model": models.files_fingerprint(run.model_path, run.model.revision)}
    return stage_key("finetune", CODE_VERSION["finetune"], spec, upstream)


def use_encoder_kernels(model: Any, run: RunSpec) -> Any:
    """Apply ``train.encoder_kernels`` to a model that has tuneval's own forward (classifiers)."""
    if hasattr(model, "own_kernels"):
        model.own_kernels = run.train.encoder_kernels == "tuneval"
    return model


def save_finetuned(
    problem: Any, model: Any, tokenizer: Any, out: Path, info: dict[str, Any], result: Any, device: Any
) -> dict[str, Any]:
    """Write a finetune artifact (model, curves) and return its metadata; solo and fused alike."""
    from tuneval import hash_dropout

    hash_dropout.uninstall(model)  # plain nn.Dropout again: the saved model has no extra buffers
    problem.save_model(model.cpu(), tokenizer, out / "model", info)
    (out / "history.json").write_text(json.dumps(result.history))
    (out / "epochs.json").write_text(json.dumps(result.epochs))
    secs = max(result.train_seconds, 1e-9)
    return {
        "device": str(device),
        "precision": result.precision,
        "kept_epoch": result.kept_epoch,
        "train_seconds": result.train_seconds,
        "optimizer_steps": result.optimizer_steps,
        "samples_per_second": result.samples / secs,
        "real_tokens_per_second": result.real_tokens / secs,
        "trainable_parameters": result.trainable_parameters,
        "info": info,
    }


def finetune(
    run: RunSpec, settings: Settings, prepared: ArtifactRef, force: bool = False, progress: bool = True
) -> StageOutcome:
    key, parts = finetune_key(run, settings, prepared)

    def build(out: Path) -> dict[str, Any]:
        if run.train.devices == 1:
            return train_and_save(run, settings, prepared, out, work_dir, progress)
        from tuneval import distributed

        distributed.check_devices(run.train.devices, settings.device)
        args = {
            "run": run.model_dump(mode="json"),
            "settings": distributed.settings_to_json(settings),
            "prepared": dataclasses.asdict(prepared),
            "out": str(out),
            "work_dir": str(work_dir),
            "progress": progress,
        }
        return distributed.launch(run.train.devices, args, work_dir)

    store = _store(settings)
    work_dir = store.work_dir("finetune", key)
    if force:
        shutil.rmtree(work_dir, ignore_errors=True)
    outcome = store.get_or_build("finetune", key, parts, build, force)
    shutil.rmtree(work_dir, ignore_errors=True)  # the committed artifact supersedes its checkpoints
    return outcome


def train_and_save(
    run: RunSpec,
    settings: Settings,
    prepared: ArtifactRef,
    out: Path,
    work_dir: Path,
    progress: bool,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """The finetune stage's work: build the model, train it, write model and curves into ``out``.

    Under ``dist`` (one of several data-parallel processes) every rank trains; rank 0 alone
    evaluates and writes; the returned meta is rank 0's."""
    from tuneval import hash_dropout, training
    from tuneval.distributed import SINGLE

    dist = dist or SINGLE
    problem = problems.get(run.benchmark.problem)
    prep_meta = prepared.meta()
    info = prep_meta["info"]
    rt = _runtime(run, settings, run.train.precision, progress=False)  # a worker's settings name its own device
    training.seed_everything(run.seed)
    tokenizer = models.load_tokenizer(run.model_path, run.model.revision, run.model.trust_remote_code)
    model = use_encoder_kernels(problem.build_model(run, tokenizer, info), run)
    hashed = hashed_dropout(run, settings)
    if hashed:
        hash_dropout.install(model, run.seed)
    train_ds = data.open_split(prepared.path, "train")
    train_ds = train_ds.select_columns([c for c in problem.TRAIN_COLUMNS if c in train_ds.column_names])
    val_ds = data.open_split(prepared.path, "validation") if "validation" in prep_meta["splits"] else None

    def evaluate(m: Any) -> dict[str, float]:
        return problem.evaluate(m, tokenizer, val_ds, info, rt)

    result = training.fit(
        model,
        train_ds,
        run.train,
        run.seed,
        problem.loss_fn,
        evaluate if val_ds is not None else None,
        tokenizer.pad_token_id,
        tokenizer.padding_side,
        rt.device,
        work_dir=work_dir,
        progress=progress,
        dist=dist,
    )
    if not dist.is_main:
        return {}
    meta = save_finetuned(problem, model, tokenizer, out, info, result, rt.device)
    if dist.active:
        meta["device"] = f"{rt.device.type} x{dist.world_size}"
    return {**meta, "devices": dist.world_size, **({"dropout_masks": "hash"} if hashed else {})}


def predict(
    run: RunSpec,
    settings: Settings,
    tuned: ArtifactRef,
    prepared: ArtifactRef,
    force: bool = False,
    progress: bool = True,
) -> StageOutcome:
    options = predict_options(run)
    key, parts = stage_key(
        "predict",
        CODE_VERSION["predict"],
        {"split": "test", **options},
        {"finetune": tuned.fingerprint, "prepare": prepared.fingerprint},
    )

    def build(out: Path) -> dict[str, Any]:
        problem = problems.get(run.benchmark.problem)
        model, tokenizer, info = problem.load_model(tuned.dir / "model")
        model = use_encoder_kernels(model, run)  # predict with the forward the model trained with
        info = {**info, **options}
        rt = _runtime(run, settings, tuned.meta()["precision"], progress)
        table = problem.predict(model, tokenizer, data.open_split(prepared.path, "test"), info, rt)
        write_parquet(table, out / "predictions.parquet")
        return {"rows": len(next(iter(table.values()))), "split": "test"}

    return _store(settings).get_or_build("predict", key, parts, build, force)


def score(
    run: RunSpec, settings: Settings, predicted: ArtifactRef, prepared: ArtifactRef, force: bool = False
) -> StageOutcome:
    names = list(run.benchmark.metrics)
    spec = {"metrics": names, "settings": {n: metrics.settings(n, run.benchmark.problem) for n in names}}
    key, parts = stage_key(
        "score", CODE_VERSION["score"], spec, {"predict": predicted.fingerprint, "prepare": prepared.fingerprint}
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

    return _store(settings).get_or_build("score", key, parts, build, force)


def predict_options(run: RunSpec) -> dict[str, Any]:
    """Benchmark settings used only at prediction time (seq2seq ``generation``): in predict's key
    and handed to the predict hook in ``info``, never in prepare's or finetune's."""
    gen = getattr(run.benchmark, "generation", None)
    return {"generation": gen.model_dump(mode="json")} if gen is not None else {}


def write_parquet(table: dict[str, list[Any]], path: Path) -> None:
    pq.write_table(pa.table(table), str(path))
