"""The pipelines.yaml schema: frozen pydantic models that reject unknown keys.

The top level (models, pipelines, schedules) is here; ``train:`` is ``config.train`` and
``benchmarks:`` is ``config.benchmarks``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SerializerFunctionWrapHandler, StringConstraints, field_validator, model_serializer

from tuneval.config.base import Name, Strict
from tuneval.config.benchmarks import BenchmarkSpec
from tuneval.config.tracking import TrackingSpec


class ModelSpec(Strict):
    source: str = Field(description="hub id, local folder, or package:NAME")
    revision: str | None = None
    trust_remote_code: bool = False
    pooling: Literal["auto", "first", "last"] = Field(
        "auto", description="auto: first token for encoders, last real token for causal LMs"
    )
    gguf_file: str | None = Field(
        None,
        description="a GGUF checkpoint: file name inside the source folder / hub repo (de-quantised; "
        "needs pip install 'tuneval[gguf]')",
    )

    @model_serializer(mode="wrap")
    def _without_unset_gguf(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # Left out when unset, so that the cache keys of every non-GGUF model stay what they were.
        data = handler(self)
        if self.gguf_file is None:
            data.pop("gguf_file", None)
        return data


class Schedule(Strict):
    """When a pipeline recurs (used by `tuneval serve`/`deploy`): standard 5-field cron."""

    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, cron: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(cron, datetime(2000, 1, 1))
        except CronSimError as e:
            raise ValueError(f"cron {cron!r} does not parse ({e}); use 5 fields, e.g. '0 3 * * 1'") from None
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, tz: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {tz!r}; use an IANA name such as 'Europe/Berlin' or 'UTC'") from None
        return tz


class Dispatch(Strict):
    """Where a scheduled pipeline's seed groups run: a Prefect work pool (`tuneval serve`/`deploy`)."""

    pool: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")] = Field(
        description="Prefect work pool whose workers run the groups (e.g. created by `prefect work-pool create`)"
    )


class PipelineSpec(Strict):
    description: str | None = None
    schedule: Schedule | None = None
    dispatch: Dispatch | None = None
    models: list[Name] = Field(min_length=1)
    benchmarks: list[Name] = Field(min_length=1)
    seeds: list[int] = Field([42], min_length=1)
    train: dict[str, object] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct (got {seeds})")
        return seeds


class Defaults(Strict):
    train: dict[str, object] = Field(default_factory=dict)


class Config(Strict):
    defaults: Defaults = Defaults()
    models: dict[Name, ModelSpec]
    benchmarks: dict[Name, BenchmarkSpec]
    pipelines: dict[Name, PipelineSpec]
    tracking: TrackingSpec = TrackingSpec()
