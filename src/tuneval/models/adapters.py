"""LoRA adapters (peft) on a task model: which layers, how they are attached, what is trained.

``peft.inject_adapter_in_model`` replaces the chosen ``nn.Linear`` (GPT-2: ``Conv1D``) layers in
place, so the task model keeps its own class and forward: the training loop, data parallel,
evaluation and prediction see the same module as without adapters. Afterwards only the adapters'
A/B matrices and the model's *fresh* modules (the task head, BERT2BERT's new cross-attention: what
was not pre-trained, listed by the problem in ``tuneval_fresh``) require gradients.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tuneval.errors import ModelError

# ``target_modules: auto``: the attention and MLP projections, by the name of the layer's last
# dotted part, per model family (model_type of the backbone's config). Families not listed fall
# back to peft's own table (attention projections only).
AUTO_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "bert": ("query", "key", "value", "dense"),
    "roberta": ("query", "key", "value", "dense"),
    "xlm-roberta": ("query", "key", "value", "dense"),
    "electra": ("query", "key", "value", "dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "t5": ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "marian": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
# Never adapted: pooling layers the heads do not read, and output layers tied to the embeddings.
SKIPPED_PARTS = ("pooler", "lm_head")


def model_types(model: nn.Module) -> list[str]:
    """The model_type of every transformers config inside ``model`` (BERT2BERT: encoder and decoder)."""
    found = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        for c in (cfg, getattr(cfg, "encoder", None), getattr(cfg, "decoder", None)):
            t = getattr(c, "model_type", None)
            if isinstance(t, str) and t not in found:
                found.append(t)
    return found


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    fresh = tuple(getattr(model, "tuneval_fresh", ()))
    out = {}
    for name, m in model.named_modules():
        parts = name.split(".")
        if not isinstance(m, nn.Linear | Conv1D) or any(p in SKIPPED_PARTS for p in parts):
            continue
        if any(f in parts or name.startswith(f + ".") or name == f for f in fresh):
            continue  # a fresh module is trained whole
        out[name] = m
    return out


def resolve_targets(model: nn.Module, requested: str | list[str], where: str) -> list[str]:
    """The full dotted names of the layers to adapt. ``where`` names the config field in errors."""
    layers = _adaptable(model)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if requested == "auto":
        types = model_types(model)
        wanted: set[str] = set()
        for t in types:
            wanted |= set(AUTO_TARGETS.get(t, ()) or _peft_default(t))
        if not wanted:
            raise ModelError(
                f"{where}: auto knows no projections for model type {', '.join(types) or type(model).__name__}; "
                f"list them (Linear layers here: {', '.join(kinds) or 'none'})"
            )
    else:
        wanted = set(requested)
        unknown = [w for w in requested if not any(n == w or n.endswith("." + w) for n in layers)]
        if unknown:
            raise ModelError(
                f"{where}: '{unknown[0]}' matches no Linear layer of this model; "
                f"choose from {', '.join(kinds) or 'none'} or use auto"
            )
        return sorted(n for n in layers if any(n == w or n.endswith("." + w) for w in wanted))
    names = sorted(n for n in layers if n.rsplit(".", 1)[-1] in wanted)
    if not names:
        raise ModelError(
            f"{where}: this model has none of the layers LoRA would adapt ({', '.join(sorted(wanted))}); "
            f"list target_modules from: {', '.join(kinds) or 'no Linear layers'}"
        )
    return names


def _peft_default(model_type: str) -> tuple[str, ...]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    return tuple(PEFT_TARGETS.get(model_type, ()))


def attach(model: nn.Module, spec: Any, targets: list[str]) -> nn.Module:
    """Inject LoRA layers at ``targets`` (full names) in place; freeze all but adapters and fresh modules."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    gpt2_style = any(isinstance(model.get_submodule(t), Conv1D) for t in targets)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        # Exact full names, anchored: "q" must not also match "...k.q" elsewhere.
        target_modules="^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$",
        fan_in_fan_out=gpt2_style,  # Conv1D stores its weight transposed
        bias="none",
    )
    inject_adapter_in_model(config, model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name or is_fresh(model, name):
            p.requires_grad_(True)
    return model


def is_fresh(model: nn.Module, param_name: str) -> bool:
    fresh = tuple(getattr(model, "tuneval_fresh", ()))
    parts = param_name.split(".")
    return any(f in parts or param_name.startswith(f + ".") for f in fresh)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def check(source: Any, train: Any, where: str) -> list[str]:
    """Before any weight is loaded: do the adapter's layers exist, does the model checkpoint its
    activations? Checked on the backbone built from its config on the meta device (no weights).
    ``source``: a ``models.source.Source``; a GGUF file's config is read from its header."""
    import torch
    from transformers import AutoConfig, AutoModel

    from tuneval.models import loading

    if train.adapter is None and not train.gradient_checkpointing:
        return []
    try:
        if source.gguf_file:  # the header alone: de-quantising the weights waits for the first stage
            config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        else:
            config = loading.load_config(source)
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config, trust_remote_code=source.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - reported by the stage that loads it, with its own message
        return [f"{where}: cannot check train.adapter / gradient_checkpointing on {source}: {str(e).splitlines()[0]}"]
    problems = []
    if train.adapter is not None:
        try:
            resolve_targets(skeleton, train.adapter.target_modules, f"{where}: train.adapter.target_modules")
        except ModelError as e:
            problems.append(str(e))
    if train.gradient_checkpointing and not getattr(skeleton, "supports_gradient_checkpointing", False):
        problems.append(
            f"{where}: train.gradient_checkpointing: {type(skeleton).__name__} does not support it; set it to false"
        )
    return problems
