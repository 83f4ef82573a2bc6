"""Load pipelines.yaml, collect every problem at once, and resolve pipelines into runs.

Style after torchtune's config validation: schema errors, cross-references and file checks
all land in one ``ConfigError``, one line each: ``file:line: yaml.path: what is wrong``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tuneval.config.messages import dedupe, describe, format_problem, line_index, suggest
from tuneval.config.paths import file_format, gguf_problem, resolve_model_source, resolve_path
from tuneval.config.schema import Config, ModelSpec, PipelineSpec
from tuneval.config.train import TrainSettings
from tuneval.errors import ConfigError

DEFAULT_CONFIG = "pipelines.yaml"


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
        lines = line_index(yaml.compose(text))
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
        problems += [(tuple(err["loc"]), describe(err)) for err in e.errors()]
    problems += _check_train_overrides(raw)
    problems += _check_devices(raw)
    problems += _check_references(raw)
    problems += _check_paths(raw, path.parent)
    if problems:
        raise ConfigError([format_problem(path, lines, loc, msg, raw) for loc, msg in dedupe(problems)])
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
            out += [(prefix + tuple(err["loc"]), describe(err)) for err in e.errors()]
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
        except ValidationError as e:
            # Each block alone was valid (else reported by _check_train_overrides) but not together.
            if _valid(base) and _valid(own):
                where = ("pipelines", name, "train")
                out += [(where + tuple(err["loc"]), describe(err)) for err in e.errors()]
            continue
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


def _valid(block: dict[str, Any]) -> bool:
    try:
        TrainSettings.model_validate(block)
    except ValidationError:
        return False
    return True


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
                        ((("pipelines", pname, kind, i)), f"unknown {kind[:-1]} '{ref}'{suggest(ref, declared)}")
                    )
    return out


def _check_paths(raw: dict[str, Any], root: Path) -> list[tuple[tuple[Any, ...], str]]:
    """File and model-folder checks on every entry that is valid on its own, so that they are
    reported together with schema errors elsewhere in the file."""
    from pydantic import TypeAdapter

    from tuneval.config.benchmarks import BenchmarkSpec

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
            elif bench.data.format is None and file_format(p) is None:
                out.append((loc, f"cannot tell the format of {p.name}; set data.format (json, csv or parquet)"))
    models = raw.get("models") if isinstance(raw.get("models"), dict) else {}
    for name, entry in models.items():
        try:
            spec = ModelSpec.model_validate(entry)
            resolved = resolve_model_source(spec, root)
        except ValidationError:
            continue
        except ValueError as e:
            out.append((("models", name, "source"), str(e)))
            continue
        if problem := gguf_problem(spec, resolved):
            out.append((("models", name, "gguf_file"), problem))
    return out


# ---------------------------------------------------------------- resolution helpers
