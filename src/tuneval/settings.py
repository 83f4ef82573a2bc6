"""Environment concerns (where caches and MLflow live, which device): not pipeline config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    project_dir: Path
    cache_dir: Path
    tracking_uri: str
    artifact_root: str | None  # None when MLFLOW_TRACKING_URI names a server that decides
    device: str
    track: bool = True

    @classmethod
    def from_env(cls, project_dir: str | os.PathLike[str], track: bool = True) -> Settings:
        project = Path(project_dir).resolve()
        cache = Path(os.environ.get("TUNEVAL_CACHE_DIR") or project / ".tuneval" / "cache").resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifact_root = None
        if not uri:
            # Always explicit: a leftover ./mlruns file store would otherwise switch MLflow's default.
            uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
            artifact_root = (project / "mlruns" / "artifacts").as_uri()
        return cls(
            project_dir=project,
            cache_dir=cache,
            tracking_uri=uri,
            artifact_root=artifact_root,
            device=os.environ.get("TUNEVAL_DEVICE", "auto"),
            track=track,
        )
