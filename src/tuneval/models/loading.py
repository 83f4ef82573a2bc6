"""Loading pre-trained backbones and tokenizers from a folder, a hub id or a registry package."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tuneval.errors import ModelError
from tuneval.models import gguf
from tuneval.models.source import Source, as_source
from tuneval.pipeline.store import hash_files

log = logging.getLogger(__name__)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)


def local_folder(source: str, revision: str | None = None) -> Path | None:
    """The folder behind ``source``: itself, or its hub snapshot when already downloaded."""
    p = Path(source)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local hub cache
        return None


def files_fingerprint(source: Source | str, revision: str | None = None, names: tuple[str, ...] | None = None) -> str:
    """Content hash of a model's files (``names`` only, when given); hub id + revision if not local.

    A GGUF source's fingerprint is its file's content, for the model and its tokenizer alike."""
    src = as_source(source, revision)
    if src.gguf_file:
        return gguf.fingerprint(src)
    folder = local_folder(src.path, src.revision)
    if folder is None:
        return f"hub:{src.path}@{src.revision or 'main'}"
    files = [p for p in folder.iterdir() if p.is_file() and (names is None or p.name in names)]
    return hash_files(files, folder)


def source_of(run: Any) -> Source:
    """The run's pre-trained model: ``RunSpec.source``, or built from a stand-in run's fields."""
    return run.source if isinstance(getattr(run, "source", None), Source) else Source.of(run.model_path, run.model)


def plain(source: Source | str, revision: str | None = None, trust_remote_code: bool = False) -> Source:
    """A source every ``from_pretrained`` reads as is: a GGUF becomes its de-quantised folder."""
    src = as_source(source, revision, trust_remote_code)
    return Source(str(gguf.dequantised(src))) if src.gguf_file else src


def load_tokenizer(source: Source | str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer; give it a pad token when it has none (causal LMs often lack one)."""
    from transformers import AutoTokenizer

    src = plain(source, revision, trust_remote_code)
    folder = Path(src.path)
    vocab_files = set(TOKENIZER_FILES) - {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
    if folder.is_dir() and not any((folder / f).is_file() for f in vocab_files):
        # transformers 5 would build an empty vocabulary here and map every word to [UNK].
        raise ModelError(
            f"{folder}: no tokenizer files ({', '.join(sorted(vocab_files))}); save the tokenizer "
            "next to the model (tokenizer.save_pretrained)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(src.path, revision=src.revision, trust_remote_code=src.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"{source}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "check the model source"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
            log.info("%s: tokenizer has no pad token; using eos %r (masked out by attention)", source, tok.eos_token)
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            log.info("%s: tokenizer has no pad or eos token; added '<pad>' (embeddings resized)", source)
    return tok


def load_config(source: Source | str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    src = plain(source, revision, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(src.path, revision=src.revision, trust_remote_code=src.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"{source}: not a loadable model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "check models.*.source"
        ) from None


def load_backbone(source: Source | str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The bare pre-trained transformer (no task head), in fp32."""
    from transformers import AutoModel

    src = plain(source, revision, trust_remote_code)
    try:
        return AutoModel.from_pretrained(
            src.path, revision=src.revision, trust_remote_code=src.trust_remote_code, dtype="float32"
        )
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"{source}: cannot load model weights ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); check that the folder holds a saved model"
        ) from None


def is_causal_lm(config: Any) -> bool:
    """Decoder-only models pool the last real token; encoders pool the first ([CLS])."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        return False
    kind = type(config)
    # BERT-like configs are in both mappings (BertLMHeadModel); only decoder-only ones are not masked LMs.
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING and kind not in MODEL_FOR_MASKED_LM_MAPPING


def hidden_size(config: Any) -> int:
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    raise ModelError(f"{type(config).__name__}: cannot tell the hidden size of this model")


def layer_stack(module: Any) -> Any:
    """The longest ModuleList of transformer blocks (encoder.layer, h, layers, ...)."""
    import torch.nn as nn

    best = None
    for _, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and (best is None or len(child) > len(best)):
            best = child
    if best is None:
        raise ModelError(f"{type(module).__name__}: no layer stack found; use trainable: all or head")
    return best
