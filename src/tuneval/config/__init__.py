"""Config: schema, loading with every error at once, and resolution into runs."""

from tuneval.config.load import DEFAULT_CONFIG, LoadedConfig, load_config
from tuneval.config.runs import RunSpec, resolve_runs, select_pipelines
from tuneval.config.schema import Config
from tuneval.config.train import TrainSettings

__all__ = [
    "DEFAULT_CONFIG",
    "Config",
    "LoadedConfig",
    "RunSpec",
    "TrainSettings",
    "load_config",
    "resolve_runs",
    "select_pipelines",
]
