"""What each stage's cache key is made of: its code version, its slice of the spec, its upstream.

Keys are computed without importing torch (a fully cached rerun plans with them), from the run's
spec, the environment settings and the upstream artifacts' fingerprints.
"""

from __future__ import annotations

from typing import Any

from tuneval import accel
from tuneval.config.runs import RunSpec
from tuneval.models import loading
from tuneval.pipeline.store import ArtifactRef, stage_key
from tuneval.settings import Settings

ORDER = ("load", "prepare", "intrinsic", "finetune", "predict", "score")
# Train settings that do not change what is learned (resume is exact), and the data caps that
# the prepare stage's key already holds: both stay out of the finetune key.
# ``compile`` and ``devices`` are not among them: with dropout on, compiled dropout and each rank
# draw other masks, so the result is another sample of the recipe (equal within tolerance only
# with dropout off: tests/test_training.py, tests/test_ddp.py).
# ``gradient_checkpointing`` recomputes the same activations with the same RNG state (non-reentrant
# checkpointing): the same result (tests/test_adapters.py).
SPEED_ONLY = {
    "eval_batch_size",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "gradient_checkpointing",
}
CAPS = {"max_train_samples", "max_eval_samples", "max_test_samples", "data_seed"}
# Bump a stage's number when its behaviour changes: Prefect's TASK_SOURCE sees only the thin
# task wrapper, never this code, so the version is explicit.
# finetune 5: the native CPU kernels and the folded clipping are gone (clip_grad_norm_ + step),
# the device kind is in the key: rounding-level changes, still another result.
CODE_VERSION = {"load": 1, "prepare": 2, "intrinsic": 1, "finetune": 5, "predict": 2, "score": 3}


def hashed_dropout(run: RunSpec) -> bool:
    """Whether this run draws dropout masks by hash (``training.hash_dropout``): when its seeds are
    trained as one multi-seed pass (``train.fuse_seeds``), so a solo run and a fused one agree."""
    return bool(run.train.fuse_seeds) and run.train.adapter is None  # adapters: solo (finetune_group)


def levers(run: RunSpec, settings: Settings) -> accel.Levers:
    """The speed levers this run trains with (``tuneval.accel``): mainstream unless measured to pay."""
    if hashed_dropout(run):  # hashed masks replace the modules tuneval's forward reads
        return accel.Levers(heap_reuse=settings.device_kind == "cpu")
    return accel.choose(run.train, run.benchmark.problem, settings.device_kind)


def model_fingerprint(run: RunSpec) -> str:
    return loading.files_fingerprint(run.source)


def finetune_key(run: RunSpec, settings: Settings, prepared: ArtifactRef) -> tuple[str, dict[str, Any]]:
    # Speed-only knobs stay out of the key: they do not change what is learned. fuse_seeds too:
    # fused and solo training agree to floating-point tolerance (tests/test_fused.py).
    # encoder_kernels enters as the forward it resolves to (accel.key_parts), "auto" meaning
    # another forward on another device.
    exclude = SPEED_ONLY | CAPS | {"fuse_seeds", "devices", "encoder_kernels"}
    if run.train.adapter is None:  # runs without adapters keep the keys they had before the setting
        exclude = exclude | {"adapter"}
    recipe = run.train.model_dump(mode="json", exclude=exclude)
    spec: dict[str, Any] = {
        "train": recipe,
        "seed": run.seed,
        "model": run.model.model_dump(mode="json", exclude={"source", "revision"}),
        # precision "auto" is bf16 on a GPU, fp32 on a CPU: another computation.
        "device": settings.device_kind,
    }
    if run.train.devices > 1:  # only then: one-process keys stay what they were before the setting
        spec["devices"] = run.train.devices
    if hashed_dropout(run):
        spec["dropout_masks"] = "hash"  # other masks than torch's dropout: another result
    spec.update(accel.key_parts(levers(run, settings)))
    upstream = {"prepare": prepared.fingerprint, "model": model_fingerprint(run)}
    return stage_key("finetune", CODE_VERSION["finetune"], spec, upstream)


def predict_options(run: RunSpec) -> dict[str, Any]:
    """Benchmark settings used only at prediction time (seq2seq ``generation``): in predict's key
    and handed to the predict hook in ``info``, never in prepare's or finetune's."""
    gen = getattr(run.benchmark, "generation", None)
    return {"generation": gen.model_dump(mode="json")} if gen is not None else {}
