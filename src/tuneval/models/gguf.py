"""GGUF checkpoints: de-quantised once into a plain transformers folder, keyed by the file's content.

Loading a GGUF (transformers de-quantises every tensor) takes about 30 s for a 135M model on two
cores, and a pipeline loads its model in several stages. ``dequantised`` converts the file once —
model, config and tokenizer, saved with ``save_pretrained`` — under
``$TUNEVAL_CACHE_DIR/gguf/<sha256>`` (else ``~/.cache/tuneval/gguf/<sha256>``), built in a temporary
folder and renamed into place under a file lock, so that every loader then reads an ordinary
folder and two processes never convert the same file at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tuneval.errors import ModelError
from tuneval.models.source import Source

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tuneval[gguf]'"
NEEDS = ("gguf", "accelerate")  # transformers reads GGUF files with both

_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def missing_packages() -> list[str]:
    """The packages transformers needs to read a GGUF file that are not installed."""
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, streamed; cached in-process per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def gguf_path(source: Source) -> Path:
    """The GGUF file on disk: inside the local folder, or in the hub cache (downloaded when online)."""
    assert source.gguf_file, "only for GGUF sources"
    folder = Path(source.path)
    if folder.is_dir():
        path = folder / source.gguf_file
        if not path.is_file():
            raise ModelError(f"{folder}: no file {source.gguf_file}; check models.*.gguf_file")
        return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source.path, source.gguf_file, revision=source.revision))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo or file alike
        raise ModelError(
            f"{source}: cannot get the GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "check models.*.source and gguf_file"
        ) from None


def fingerprint(source: Source) -> str:
    """The model's (and its tokenizer's) fingerprint: the GGUF file's content."""
    return f"gguf-sha256:{file_sha256(gguf_path(source))}"


def cache_root() -> Path:
    env = os.environ.get("TUNEVAL_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve() / "gguf"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tuneval" / "gguf"


def dequantised(source: Source) -> Path:
    """A plain transformers folder holding the GGUF's model, config and tokenizer (fp32), built once."""
    from filelock import FileLock

    path = gguf_path(source)
    if missing_packages():
        raise ModelError(f"{source}: reading a GGUF file needs {' and '.join(missing_packages())}; {INSTALL_HINT}")
    root = cache_root()
    folder = root / file_sha256(path)
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "config.json").is_file():  # another process converted it meanwhile
            return folder
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        try:
            convert(path, tmp)
            if folder.exists():  # a half-written leftover without config.json: never read
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("%s: de-quantised into %s in %.1f s", path.name, folder, time.perf_counter() - start)
    return folder


def convert(path: Path, out: Path) -> None:
    """Load the GGUF with transformers (weights de-quantised to fp32) and save it as a folder."""
    from transformers import AutoConfig, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": path.name}
    try:
        config = AutoConfig.from_pretrained(path.parent, **kw)
        model = model_class(config).from_pretrained(path.parent, dtype="float32", **kw, **dense())
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    except Exception as e:  # noqa: BLE001 - unsupported architecture, corrupt file alike
        raise ModelError(
            f"{path}: cannot load this GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "use a GGUF of an architecture transformers reads (llama, mistral, qwen2, gpt2, ...)"
        ) from None
    # The weights are plain fp32 tensors now: save the model as an ordinary, unquantised one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dense() -> dict[str, Any]:
    """Ask for every weight unpacked (newer transformers may otherwise keep GGUF blocks packed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def model_class(config: Any) -> Any:
    """The class whose checkpoint keeps every tensor of the file (the LM head included)."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
    )

    if getattr(config, "is_encoder_decoder", False) and type(config) in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
        return AutoModelForSeq2SeqLM
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    return AutoModel
