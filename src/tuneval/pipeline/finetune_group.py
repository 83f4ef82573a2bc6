"""The finetune stage of a seed group trained in one multi-seed pass (``train.fuse_seeds``).

Each seed's artifact lands under its own seed's key, exactly where the solo stage looks for it;
seeds left out (cached already, resumable from a checkpoint, or fusion not applicable) are trained
by the solo stage as before.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from filelock import FileLock

from tuneval import problems
from tuneval.data.splits import open_split
from tuneval.models import loading
from tuneval.pipeline import keys
from tuneval.pipeline.finetune import save_finetuned
from tuneval.pipeline.stages import runtime, store_of
from tuneval.pipeline.store import StageOutcome
from tuneval.training import checkpoints
from tuneval.training.device import resolve_device, resolve_precision, seed_everything
from tuneval.training.loop import NonFiniteLoss, TrainResult
from tuneval.training.multi_seed import install_hash_dropout, train_fused, why_not

log = logging.getLogger(__name__)


def finetune_seeds(
    runs: list[Any], settings: Any, prepared: Any, force: bool = False, progress: bool = True
) -> tuple[dict[int, Any], str | None]:
    """Build the finetune artifacts of a seed group (runs that differ only by seed) in one
    multi-seed pass, each under its own seed's key, exactly where the solo stage looks for it.

    Returns ``({seed: StageOutcome}, reason)``: the outcomes of the seeds built fused, and why
    fusion did not apply (None when it did). Seeds left out (cached already, resumable from a solo
    checkpoint, or fusion not applicable) are trained by the solo stage as before. The pass
    checkpoints into a work folder keyed by its seeds' keys, so an interrupted pass resumes; one
    process at a time trains a group (a file lock, as the store takes per key).
    """
    if not runs:
        return {}, "no runs"
    if runs[0].train.fuse_seeds and runs[0].train.adapter is not None:
        return _fallback(runs, "LoRA adapters (train.adapter) are not stacked across seeds; fuse_seeds ignored")
    if not all(keys.hashed_dropout(r) for r in runs):
        return {}, "train.fuse_seeds is off"
    if any(_group_of(r) != _group_of(runs[0]) for r in runs):
        return _fallback(runs, "the runs differ in more than the seed (hyperparameters, model or benchmark)")
    store = store_of(settings)
    todo = _left_to_train(runs, settings, prepared, store, force)
    if len(todo) < 2:
        return {}, f"{len(todo)} seed(s) left to train"
    group_key = hashlib.sha256("".join(key for _, key, _ in todo).encode()).hexdigest()[:24]
    (store.root / "finetune").mkdir(parents=True, exist_ok=True)
    with FileLock(str(store.root / "finetune" / f"seeds-{group_key}.lock")):
        todo = _left_to_train(runs, settings, prepared, store, force)  # another process may have built them
        if len(todo) < 2:
            return {}, f"{len(todo)} seed(s) left to train"
        work_dir = store.work_dir("finetune", f"seeds-{group_key}")
        if force:
            checkpoints.clear(work_dir)
        outcomes, reason = _train_and_commit(todo, settings, prepared, store, work_dir, force, progress)
        if reason is None:
            checkpoints.clear(work_dir)  # the committed artifacts supersede the pass's checkpoints
        return outcomes, reason


def _left_to_train(
    runs: list[Any], settings: Any, prepared: Any, store: Any, force: bool
) -> list[tuple[Any, str, Any]]:
    todo = []
    for r in runs:
        key, parts = keys.finetune_key(r, settings, prepared)
        work = store.work_dir("finetune", key)
        if force:
            checkpoints.clear(work)
        elif store.lookup("finetune", key) is not None or (work.is_dir() and any(work.iterdir())):
            continue  # cached, or a solo run's checkpoints to resume from
        todo.append((r, key, parts))
    return todo


def _fallback(runs: list[Any], reason: str) -> tuple[dict[int, Any], str]:
    log.warning("finetune: seeds %s trained one at a time: %s", [r.seed for r in runs], reason)
    return {}, reason


def _train_and_commit(
    todo: list[tuple[Any, str, Any]],
    settings: Any,
    prepared: Any,
    store: Any,
    work_dir: Any,
    force: bool,
    progress: bool,
) -> tuple[dict[int, Any], str | None]:
    start = time.perf_counter()
    first = todo[0][0]
    runs = [r for r, _, _ in todo]
    problem = problems.get(first.benchmark.problem)
    device = resolve_device(settings.device)
    precision = resolve_precision(first.train.precision, device)
    info = prepared.meta()["info"]
    tokenizer = loading.load_tokenizer(first.source)
    built = []
    for r in runs:
        seed_everything(r.seed)  # the head's initialisation: as the solo stage draws it
        built.append(problem.build_model(r, tokenizer, info))
    reason = why_not(built, [r.train for r in runs], precision)
    if reason is None and tokenizer.padding_side != "right":
        reason = "left padding moves real tokens when batches pad further (hashed masks would differ)"
    if reason is not None:
        return _fallback(runs, reason)
    seeds = [r.seed for r in runs]
    install_hash_dropout(built, seeds)
    prep_meta = prepared.meta()
    train_ds = open_split(prepared.path, "train")
    train_ds = train_ds.select_columns([c for c in problem.TRAIN_COLUMNS if c in train_ds.column_names])
    val_ds = open_split(prepared.path, "validation") if "validation" in prep_meta["splits"] else None
    rt = runtime(first, settings, first.train.precision, progress=False)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return problem.evaluate(m, tokenizer, val_ds, info, rt)

    evaluates = [evaluate if val_ds is not None else None] * len(built)
    pad_id, side = tokenizer.pad_token_id, tokenizer.padding_side
    try:
        results = train_fused(
            built, seeds, train_ds, first.train, evaluates, pad_id, side, device, progress, precision, work_dir
        )
    except torch.OutOfMemoryError:
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        checkpoints.clear(work_dir)  # the seeds train alone now: the stacked checkpoints are of no use
        return _fallback(runs, f"out of memory with {len(seeds)} seeds stacked")
    except NonFiniteLoss as e:
        checkpoints.clear(work_dir)
        return _fallback(runs, f"{e}; each seed retries alone (fit's recoveries)")
    outcomes = {}
    for (r, key, parts), m, res in zip(todo, built, results, strict=True):

        def build(out: Any, m: nn.Module = m, res: TrainResult = res) -> dict[str, Any]:
            meta = save_finetuned(problem, m, tokenizer, out, info, res, device)
            return {**meta, "dropout_masks": "hash", "fused_seeds": seeds}

        o = store.get_or_build("finetune", key, parts, build, force)
        checkpoints.clear(store.work_dir("finetune", key))
        # "fused": built here by the group's one pass (its seconds are the whole pass's).
        outcomes[r.seed] = StageOutcome(o.ref, "fused" if o.status == "ran" else o.status, 0.0, o.key_parts)
    seconds = time.perf_counter() - start
    outcomes = {seed: replace(o, seconds=seconds) for seed, o in outcomes.items()}
    log.info("finetune: seeds %s trained fused in %.1f s", seeds, results[0].train_seconds)
    return outcomes, None


def _group_of(run: Any) -> Any:
    """Everything of a run but its seed (and the fusion switch)."""
    d = run.model_dump(mode="json", exclude={"seed"})
    d["train"].pop("fuse_seeds", None)
    return d
