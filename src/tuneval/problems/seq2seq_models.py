"""Seq2seq models by architecture: build, save, load, and teacher-forced token NLL.

Three architectures:
- ``encoder-decoder``: a pre-trained seq2seq model (T5, BART, Marian) via AutoModelForSeq2SeqLM.
- ``encoder-only``: a BERT-like encoder warm-started as BERT2BERT with
  ``EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)``; the cross-attention is new
  (randomly initialised), the decoder starts from [CLS] and stops at [SEP].
- ``decoder-only``: a causal LM trained on prompt + target + eos.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneval.data.batching import PAD_LABEL, iterate, make_collate, sorted_batches
from tuneval.errors import ModelError
from tuneval.models import loading

log = logging.getLogger(__name__)
# EncoderDecoderModel warns on every labelled call that pre-4.12 checkpoints computed the loss
# differently; it does not apply to models warm-started here.
warnings.filterwarnings("ignore", message="Version v4.12.0 introduces a better way", category=FutureWarning)

ENCODER_DECODER, ENCODER_ONLY, DECODER_ONLY = "encoder-decoder", "encoder-only", "decoder-only"
MODEL_CONFIG = "tuneval_seq2seq.json"
PREFIX_FAMILIES = ("t5", "mt5", "umt5", "longt5", "switch_transformers")  # pre-trained with task prefixes


def architecture(config: Any) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    return DECODER_ONLY if loading.is_causal_lm(config) else ENCODER_ONLY


@functools.lru_cache(maxsize=8)
def architecture_of(source: loading.Source | str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    return architecture(loading.load_config(source, revision, trust_remote_code))


def uses_prefix(model_type: str) -> bool:
    return model_type in PREFIX_FAMILIES


def ensure_special_tokens(tokenizer: Any, arch: str, source: str) -> list[str]:
    """Give a decoder-only tokenizer the eos (and pad) it needs; check encoder-only ones.

    Deterministic, so the prepare and finetune stages' tokenizers agree on the new ids.
    """
    added: list[str] = []
    if arch == DECODER_ONLY:
        if tokenizer.eos_token is None:
            tokenizer.add_special_tokens({"eos_token": "</s>"})
            added.append("eos '</s>'")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            added.append("pad = eos")
        if added:
            log.warning("%s: tokenizer had no %s; added (embeddings resized)", source, " or ".join(added))
    elif arch == ENCODER_ONLY:
        if start_id(tokenizer) is None or stop_id(tokenizer) is None:
            raise ModelError(
                f"{source}: an encoder warm-started as BERT2BERT needs [CLS]/[SEP] (or bos/eos) tokens, "
                "and this tokenizer has neither; use another model"
            )
    return added


def start_id(tokenizer: Any) -> int | None:
    return tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id


def stop_id(tokenizer: Any) -> int | None:
    return tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


def decoder_start_id(model_config: Any, tokenizer: Any, arch: str) -> int | None:
    """The token the decoder starts from: the model's own for encoder-decoders, [CLS] for BERT2BERT."""
    if arch == ENCODER_DECODER:
        return getattr(model_config, "decoder_start_token_id", None)
    if arch == ENCODER_ONLY:
        return start_id(tokenizer)
    return None


def _resize(model: nn.Module, tokenizer: Any) -> None:
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def build(source: loading.Source | str, tokenizer: Any) -> tuple[nn.Module, str]:
    """The pre-trained starting point for seq2seq fine-tuning, and its architecture."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, EncoderDecoderModel

    src = loading.plain(source)  # a GGUF: its de-quantised folder
    source, revision, trust_remote_code = src.path, src.revision, src.trust_remote_code
    arch = architecture_of(source, revision, trust_remote_code)
    ensure_special_tokens(tokenizer, arch, source)
    kw = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": "float32"}
    try:
        if arch == ENCODER_DECODER:
            model = AutoModelForSeq2SeqLM.from_pretrained(source, **kw)
        elif arch == DECODER_ONLY:
            model = AutoModelForCausalLM.from_pretrained(source, **kw)
        else:
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(
                source, source, encoder_revision=revision, decoder_revision=revision
            )
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"{source}: cannot load it as a {arch} seq2seq model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); check models.*.source"
        ) from None
    configure_special_ids(model, tokenizer, arch)
    if arch != ENCODER_ONLY:  # EncoderDecoderModel cannot resize; BERT vocabularies need no new tokens
        _resize(model, tokenizer)
    return model, arch


def configure_special_ids(model: nn.Module, tokenizer: Any, arch: str) -> None:
    """Start, pad and eos ids on the config (used to shift labels) and the generation config."""
    cfg, gen = model.config, model.generation_config
    if arch == ENCODER_ONLY:
        cfg.decoder_start_token_id = start_id(tokenizer)
        cfg.eos_token_id = stop_id(tokenizer)
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.vocab_size = cfg.decoder.vocab_size
    elif arch == DECODER_ONLY:
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
    gen.decoder_start_token_id = getattr(cfg, "decoder_start_token_id", None)
    gen.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else tokenizer.pad_token_id
    gen.eos_token_id = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id


def save(model: nn.Module, tokenizer: Any, folder: Path, arch: str, info: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / MODEL_CONFIG).write_text(json.dumps({"architecture": arch, "info": info}, indent=1))


def load(folder: Path) -> tuple[nn.Module, Any, str, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, EncoderDecoderModel

    meta = json.loads((folder / MODEL_CONFIG).read_text())
    arch = meta["architecture"]
    cls = {ENCODER_DECODER: AutoModelForSeq2SeqLM, DECODER_ONLY: AutoModelForCausalLM}.get(arch, EncoderDecoderModel)
    model = cls.from_pretrained(str(folder / "model"), dtype="float32")
    tokenizer = loading.load_tokenizer(str(folder / "model"))
    return model, tokenizer, arch, meta["info"]


@torch.inference_mode()
def token_nll(
    model: nn.Module, ds: Any, pad_id: int, device: torch.device, batch_size: int, precision: str = "fp32"
) -> dict[str, list[float]]:
    """Teacher-forced NLL per example, summed over label tokens (labels != -100), in nats.

    Also counts the tokens and the greedy next-token hits. Decoder-only models predict position
    t+1 from position t, so logits and labels are shifted by one; encoder-decoders align already.
    """
    model.eval().to(device)
    ds = ds.select_columns(["input_ids", "attention_mask", "labels"])
    batches = sorted_batches([len(x) for x in ds["input_ids"]], batch_size)
    collate = make_collate(pad_id, "right")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    decoder_only = not model.config.is_encoder_decoder
    out = {k: [0.0] * len(ds) for k in ("nll", "tokens", "correct")}
    for idx, batch in iterate(ds, batches, collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if decoder_only:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits, labels = logits[:, :-1], labels[:, 1:]
            else:
                logits = model(**batch).logits
        logits = logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=PAD_LABEL, reduction="none")
        mask = labels != PAD_LABEL
        hits = (logits.argmax(-1) == labels) & mask
        for row, i in enumerate(idx):
            out["nll"][i] = float(nll[row].sum())
            out["tokens"][i] = float(mask[row].sum())
            out["correct"][i] = float(hits[row].sum())
    return out
