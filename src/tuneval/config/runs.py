"""Resolve a pipeline into runs: one frozen, fully explicit spec per model x benchmark x seed.

A ``RunSpec`` is the one thing hashed into cache keys and flattened into MLflow params.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict

from tuneval.config.benchmarks import BenchmarkSpec
from tuneval.config.load import LoadedConfig, merged_train
from tuneval.config.messages import suggest
from tuneval.config.paths import resolve_model_source, resolve_path
from tuneval.config.schema import ModelSpec
from tuneval.config.tracking import TrackingSpec
from tuneval.config.train import TrainSettings
from tuneval.errors import ConfigError
from tuneval.models.source import Source


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str
    model_name: str
    model: ModelSpec
    model_path: str  # a local folder or a hub id, resolved from model.source
    benchmark_name: str
    benchmark: BenchmarkSpec  # data file paths made absolute
    seed: int
    train: TrainSettings
    tracking: TrackingSpec = TrackingSpec()  # what the MLflow record holds; in no cache key

    @property
    def source(self) -> Source:
        """The pre-trained model, as every loader and fingerprint takes it."""
        return Source.of(self.model_path, self.model)

    @property
    def run_name(self) -> str:
        return f"{self.model_name}__{self.benchmark_name}__seed{self.seed}"

    def params(self) -> dict[str, Any]:
        """The resolved spec as a nested dict (paths included), for MLflow params."""
        return self.model_dump(mode="json")


def select_pipelines(loaded: LoadedConfig, names: list[str] | None) -> list[str]:
    declared = loaded.config.pipelines
    if not names:
        return list(declared)
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise ConfigError(
            [f"{loaded.path.name}: pipelines: no pipeline named '{n}'{suggest(n, declared)}" for n in unknown]
        )
    return names


def resolve_runs(loaded: LoadedConfig, names: list[str] | None = None) -> list[RunSpec]:
    """Expand the selected pipelines into runs, checking what only matters when running."""
    cfg, root = loaded.config, loaded.root
    runs: list[RunSpec] = []
    problems: list[str] = []
    for pname in select_pipelines(loaded, names):
        pipe = cfg.pipelines[pname]
        train = merged_train(cfg, pipe)
        for mname in pipe.models:
            model = cfg.models[mname]
            model_path = resolve_model_source(model, root)
            if not os.path.isdir(model_path) and _offline() and not _in_hub_cache(model_path, model):
                problems.append(
                    f"{loaded.path.name}: models.{mname}.gguf_file: {model.gguf_file} of hub repo '{model.source}' "
                    "is not in the hub cache and the hub is offline (HF_HUB_OFFLINE=1); give a local folder "
                    "holding it or package:NAME"
                    if model.gguf_file
                    else f"{loaded.path.name}: models.{mname}.source: '{model.source}' is a hub id but the "
                    "hub is offline (HF_HUB_OFFLINE=1); give a local folder or package:NAME"
                )
                continue
            if train.adapter is not None or train.gradient_checkpointing:
                from tuneval.models import adapters  # imports torch: only for the runs that need it

                where = f"{loaded.path.name}: pipelines.{pname} (model {mname})"
                problems += adapters.check(Source.of(model_path, model), train, where)
            for bname in pipe.benchmarks:
                bench = _absolute_paths(cfg.benchmarks[bname], loaded)
                if bench.data.hub and _offline():
                    problems.append(
                        f"{loaded.path.name}: benchmarks.{bname}.data.hub: '{bench.data.hub}' needs the "
                        "hub, which is offline (HF_DATASETS_OFFLINE=1); use data.files"
                    )
                    continue
                for seed in pipe.seeds:
                    runs.append(
                        RunSpec(
                            pipeline=pname,
                            model_name=mname,
                            model=model,
                            model_path=model_path,
                            benchmark_name=bname,
                            benchmark=bench,
                            seed=seed,
                            train=train,
                            tracking=cfg.tracking,
                        )
                    )
    if problems:
        raise ConfigError(sorted(set(problems)))
    return runs


def _in_hub_cache(repo_id: str, model: ModelSpec) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, model.gguf_file or "config.json", revision=model.revision)
    return isinstance(found, str)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _absolute_paths(bench: Any, loaded: LoadedConfig) -> Any:
    files = bench.data.files
    if not files:
        return bench
    absolute = {split: str(resolve_path(f, loaded.root)) for split, f in files.items()}
    return bench.model_copy(update={"data": bench.data.model_copy(update={"files": absolute})})
