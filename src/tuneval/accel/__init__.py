"""The one seam for speed code. The core asks it three things and imports nothing else from here:

- ``choose(train, problem, device_kind)``: which levers a run uses (``Levers``);
- ``key_parts(levers)``: what of that choice changes a trained result (it enters the finetune key);
- ``apply(model, levers)`` / ``enter_training(levers)``: put the choice into effect on a model
  and on the training process.

Everything not chosen here is the mainstream path: transformers' own forward (SDPA attention),
torch's fused AdamW, ``clip_grad_norm_`` then ``optimizer.step()``, autocast where the device has it.
A lever is kept only where an interleaved step A/B on that device showed it to pay (>= 5% of a
step, ``benchmarks/step_ab.py``); so far that is the CPU alone:

- ``encoder_forward``: tuneval's own BERT [CLS] forward (``bert_cls``) for encoder
  classification: the last layer for [CLS] only, cheaper CPU dropout masks;
- ``heap_reuse``: glibc keeps freed memory for reuse while training (``heap``).

This module imports neither torch nor transformers: planning a cached run asks for the key parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Bump when tuneval's forward draws its masks or computes differently: another result, another key.
FORWARD_VERSION = 3


@dataclass(frozen=True)
class Levers:
    """The speed levers of one run; ``Levers()`` is the mainstream path."""

    encoder_forward: bool = False  # tuneval's [CLS] forward for BERT-family encoder classifiers
    cheap_dropout: bool = True  # within it: 16-bit uniform dropout masks (CPU)
    heap_reuse: bool = False  # glibc heap reuse while training (CPU)


MAINSTREAM = Levers()


def choose(train: Any, problem: str, device_kind: str) -> Levers:
    """The levers for ``train`` (TrainSettings) on a ``device_kind`` ("cpu" | "cuda" | ...).

    ``train.encoder_kernels``: ``auto`` = tuneval's forward on CPU only, ``tuneval`` = everywhere it
    applies, ``transformers`` = never. Only classification has a [CLS] head to feed.
    """
    wanted = {"auto": device_kind == "cpu", "tuneval": True, "transformers": False}[train.encoder_kernels]
    # tuneval's forward reads the Linear weights itself: LoRA layers wrapping them, and transformers'
    # activation recomputation, live in the modules' own forwards, which it does not call.
    wanted = wanted and train.adapter is None and not train.gradient_checkpointing
    return Levers(encoder_forward=wanted and problem == "classification", heap_reuse=device_kind == "cpu")


def key_parts(levers: Levers) -> dict[str, Any]:
    """What of ``levers`` enters the finetune key: tuneval's forward draws other dropout masks than
    transformers' (another sample of the recipe). The heap changes no number."""
    return {"encoder_forward": f"tuneval-{FORWARD_VERSION}"} if levers.encoder_forward else {}


def apply(model: Any, levers: Levers) -> Any:
    """Give a model that offers an ``encoder_forward`` slot (classifiers) tuneval's forward where it
    reproduces the backbone, or clear the slot (transformers' forward). Returns ``model``."""
    if not hasattr(model, "encoder_forward"):
        return model
    model.encoder_forward = None
    if levers.encoder_forward:
        from tuneval.accel import bert_cls

        if bert_cls.supports(model.backbone, model.pooling):
            model.encoder_forward = bert_cls.Forward(bert_cls.Options(cheap_dropout=levers.cheap_dropout))
    return model


def enter_training(levers: Levers) -> None:
    """Process-wide levers, switched on before a training loop starts."""
    if levers.heap_reuse:
        from tuneval.accel import heap

        heap.keep_freed_memory()
