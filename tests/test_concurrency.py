"""Two `tuneval run` processes on one project: one computes each stage, the other waits and reuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneval.pipeline.store import verify

pytestmark = pytest.mark.integration


def test_two_processes_share_the_cache_without_corruption(project: Path) -> None:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneval.cli",
                "run",
                "--config",
                str(project / "pipelines.yaml"),
                "--json",
                str(project / f"{name}.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ),
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = [json.loads((project / f"{n}.json").read_text())["runs"][0] for n in ("a", "b")]
    finetunes = sorted(r["stages"]["finetune"]["status"] for r in runs)
    assert finetunes == ["cached", "ran"]
    assert runs[0]["metrics"] == runs[1]["metrics"]
    artifacts = [p.parent for p in (project / ".tuneval" / "cache").glob("*/*/manifest.json")]
    assert len(artifacts) == 5 and all(verify(a) for a in artifacts)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["FINISHED", "FINISHED"]
