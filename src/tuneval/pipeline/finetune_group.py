"""The finetune stage of a seed group trained in one multi-seed pass (``train.fuse_seeds``).

Each seed's artifact lands under its own seed's key, exactly where the solo stage looks for it;
seeds left out (cached already, resumable from a checkpoint, or fusion not applicable) are trained
by the solo stage as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

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
    """Build the finetune artifacts of a seed group (runs that differ only by seed) in one fused
    pass, each under its own seed's key, exactly where the solo stage looks for it.

    Returns ``({seed: StageOutcome}, reason)``: the outcomes of the seeds built fused, and why
    fusion did not apply (None when it did). Seeds left out (cached already, resumable from a
    checkpoint, or fusion not applicable) are trained by the solo stage as before.
    """
    start = time.perf_counter()

    def fallback(reason: str) -> tuple[dict[int, Any], str]:
        log.warning("finetune: seeds %s trained one at a time: %s", [r.seed for r in runs], reason)
        return {}, reason

    if not runs:
        return {}, "no runs"
    if not all(keys.hashed_dropout(r) for r in runs):
        return {}, "train.fuse_seeds is off"
    first = runs[0]
    if any(_group_of(r) != _group_of(first) for r in runs):
        return fallback("the runs differ in more than the seed (hyperparameters, model or benchmark)")
    store = store_of(settings)
    todo = []
    for r in runs:
        key, parts = keys.finetune_key(r, settings, prepared)
        work = store.work_dir("finetune", key)
        if force:
            checkpoints.clear(work)
        elif store.lookup("finetune", key) is not None or (work.is_dir() and any(work.iterdir())):
            continue  # cached, or a solo run's checkpoints to resume from
        todo.append((r, key, parts))
    if len(todo) < 2:
        return {}, f"{len(todo)} seed(s) left to train"
    problem = problems.get(first.benchmark.problem)
    device = resolve_device(settings.device)
    precision = resolve_precision(first.train.precision, device)
    info = prepared.meta()["info"]
    tokenizer = loading.load_tokenizer(first.model_path, first.model.revision, first.model.trust_remote_code)
    built = []
    for r, _, _ in todo:
        seed_everything(r.seed)  # the head's initialisation: as the solo stage draws it
        built.append(problem.build_model(r, tokenizer, info))
    reason = why_not(built, [r.train for r, _, _ in todo], precision)
    if reason is None and tokenizer.padding_side != "right":
        reason = "left padding moves real tokens when batches pad further (hashed masks would differ)"
    if reason is not None:
        return fallback(reason)
    seeds = [r.seed for r, _, _ in todo]
    install_hash_dropout(built, seeds)
    prep_meta = prepared.meta()
    train_ds = open_split(prepared.path, "train")
    train_ds = train_ds.select_columns([c for c in problem.TRAIN_COLUMNS if c in train_ds.column_names])
    val_ds = open_split(prepared.path, "validation") if "validation" in prep_meta["splits"] else None
    rt = runtime(first, settings, first.train.precision, progress=False)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return problem.evaluate(m, tokenizer, val_ds, info, rt)

    try:
        results = train_fused(
            built,
            seeds,
            train_ds,
            first.train,
            [evaluate if val_ds is not None else None] * len(built),
            tokenizer.pad_token_id,
            tokenizer.padding_side,
            device,
            progress=progress,
            precision=precision,
        )
    except torch.OutOfMemoryError:
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return fallback(f"out of memory with {len(seeds)} seeds stacked")
    except NonFiniteLoss as e:
        return fallback(f"{e}; each seed retries alone (fit's recoveries)")
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
