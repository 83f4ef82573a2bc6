"""The finetune stage: one seed's model trained with the written-out loop, or its data-parallel run.

The stage computes its key (``keys.finetune_key``), then builds the artifact in this process
(``train_and_save``) or, with ``train.devices`` > 1, under torchrun (``training.launch``), whose
rank 0 calls ``train_and_save`` too. A seed group trained in one multi-seed pass writes the same
artifacts through ``save_finetuned`` (``pipeline.finetune_group``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneval import accel, problems
from tuneval.config.runs import RunSpec
from tuneval.data.splits import open_split
from tuneval.models import finetuned, loading
from tuneval.pipeline import keys
from tuneval.pipeline.stages import runtime, store_of
from tuneval.pipeline.store import ArtifactRef, StageOutcome
from tuneval.settings import Settings

if TYPE_CHECKING:
    from tuneval.training.distributed import Dist


def finetune(
    run: RunSpec, settings: Settings, prepared: ArtifactRef, force: bool = False, progress: bool = True
) -> StageOutcome:
    key, parts = keys.finetune_key(run, settings, prepared)

    def build(out: Path) -> dict[str, Any]:
        if run.train.devices == 1:
            return train_and_save(run, settings, prepared, out, work_dir, progress)
        from tuneval.training import launch
        from tuneval.training.distributed import check_devices

        check_devices(run.train.devices, settings.device)
        args = {
            "run": run.model_dump(mode="json"),
            "settings": launch.settings_to_json(settings),
            "prepared": dataclasses.asdict(prepared),
            "out": str(out),
            "work_dir": str(work_dir),
            "progress": progress,
        }
        return launch.launch(run.train.devices, args, work_dir, "tuneval.pipeline.ddp_worker")

    store = store_of(settings)
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
    from tuneval.training import hash_dropout, recompute
    from tuneval.training.device import seed_everything
    from tuneval.training.distributed import SINGLE
    from tuneval.training.recovery import fit

    dist = dist or SINGLE
    problem = problems.get(run.benchmark.problem)
    prep_meta = prepared.meta()
    info = prep_meta["info"]
    rt = runtime(run, settings, run.train.precision, progress=False)  # a worker's settings name its own device
    seed_everything(run.seed)
    tokenizer = loading.load_tokenizer(run.source)
    levers = keys.levers(run, settings)
    model = problem.build_model(run, tokenizer, info)
    targets = finetuned.prepare(model, run)  # LoRA adapters, when train.adapter says so
    if run.train.gradient_checkpointing:
        recompute.enable(model)
    model = accel.apply(model, levers)
    hashed = keys.hashed_dropout(run)
    if hashed:
        hash_dropout.install(model, run.seed)
    train_ds = open_split(prepared.path, "train")
    train_ds = train_ds.select_columns([c for c in problem.TRAIN_COLUMNS if c in train_ds.column_names])
    val_ds = open_split(prepared.path, "validation") if "validation" in prep_meta["splits"] else None

    def evaluate(m: Any) -> dict[str, float]:
        return problem.evaluate(m, tokenizer, val_ds, info, rt)

    accel.enter_training(levers)
    result = fit(
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
    meta = save_finetuned(problem, model, tokenizer, out, info, result, rt.device, run)
    if targets:
        meta["adapter_layers"] = len(targets)
    if dist.active:
        meta["device"] = f"{rt.device.type} x{dist.world_size}"
    return {**meta, "devices": dist.world_size, **({"dropout_masks": "hash"} if hashed else {})}


def save_finetuned(
    problem: Any,
    model: Any,
    tokenizer: Any,
    out: Path,
    info: dict[str, Any],
    result: Any,
    device: Any,
    run: RunSpec | None = None,
) -> dict[str, Any]:
    """Write a finetune artifact (model, curves) and return its metadata; solo and multi-seed alike.
    With ``run.train.adapter`` the model folder holds the adapters and the head only."""
    from tuneval.training import hash_dropout

    hash_dropout.uninstall(model)  # plain nn.Dropout again: the saved model has no extra buffers
    finetuned.save(problem, model.cpu(), tokenizer, out / "model", info, run)
    model_bytes = sum(f.stat().st_size for f in (out / "model").rglob("*") if f.is_file())
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
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes,
        "info": info,
    }
