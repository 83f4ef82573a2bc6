"""Environment concerns (where caches and MLflow live, which device): not pipeline config."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path


def new_invocation_id() -> str:
    """Sortable by time, unique enough across machines: 20261126T074000Z-3f9a1c."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class Settings:
    project_dir: Path
    cache_dir: Path
    tracking_uri: str
    artifact_root: str | None  # None when MLFLOW_TRACKING_URI names a server that decides
    device: str
    track: bool = True
    # One id per `tuneval run`, tagged on every MLflow run it makes: "the previous run of a pipeline".
    invocation: str = field(default_factory=new_invocation_id)

    @property
    def device_kind(self) -> str:
        """ "cuda" or "cpu" (or another torch device type): what ``device`` resolves to, told without
        importing torch, because it decides cache keys and a cached rerun plans without torch.
        ``auto`` is CUDA when an NVIDIA driver is visible and CUDA_VISIBLE_DEVICES hides no card."""
        if self.device != "auto":
            return self.device.split(":")[0]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "cuda" if Path("/proc/driver/nvidia/version").exists() and visible not in ("", "-1") else "cpu"

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
