"""``train.gradient_checkpointing``: transformers' own activation recomputation, switched on.

Each outermost transformers model inside the task model (a classifier's backbone, the QA model,
the seq2seq model) recomputes its layers' activations in the backward pass instead of keeping
them. Non-reentrant checkpointing: it needs no input that requires grad (frozen embeddings under
LoRA) and restores the RNG state, so dropout draws the same masks and the result is the same.
"""

from __future__ import annotations

import torch.nn as nn

from tuneval.errors import ModelError


def enable(model: nn.Module) -> list[str]:
    """Switch it on; the names of the models it applies to. A model that cannot is an input error."""
    from transformers import PreTrainedModel

    done: list[str] = []
    covered: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, PreTrainedModel) or any(name.startswith(c + ".") for c in covered if c):
            continue
        covered.append(name)
        if not m.supports_gradient_checkpointing:
            raise ModelError(
                f"train.gradient_checkpointing: {type(m).__name__} does not support gradient checkpointing; "
                "set it to false for this model"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        done.append(type(m).__name__)
        if not name:
            break  # the model itself is a transformers model: it covers everything
    if not done:
        raise ModelError(
            f"train.gradient_checkpointing: {type(model).__name__} holds no transformers model; set it to false"
        )
    return done
