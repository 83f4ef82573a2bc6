"""MLflow logging never crashes a run and never writes a secret."""

from __future__ import annotations

from pathlib import Path

from tuneval.tracking.client import MAX_PARAM_VALUE, Tracker


def test_limits_and_secrets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_s3cr3t_value_123")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "art").as_uri())
    run_id = tracker.start("exp", "r", {})
    params = {f"p{i}": i for i in range(1000)}
    params.update(
        {"long": "x" * 20_000, "nested": {"api_key": "abcdef123", "source": "org/m?token=hf_s3cr3t_value_123"}}
    )
    tracker.log_params(run_id, params)
    tracker.log_params(run_id, {"p1": "changed"})  # MLflow rejects changing a param: warned, not raised
    tracker.set_tags(run_id, {"note": "leaked hf_s3cr3t_value_123"})
    tracker.finish(run_id, ok=True)

    run = tracker.client.get_run(run_id)
    assert len(run.data.params) == 1003
    assert len(run.data.params["long"]) == MAX_PARAM_VALUE and run.data.params["long"].endswith("[truncated]")
    assert run.data.params["nested.api_key"] == "***"
    assert "hf_s3cr3t" not in run.data.params["nested.source"] and "***" in run.data.params["nested.source"]
    assert "hf_s3cr3t" not in run.data.tags["note"]
    assert run.data.params["p1"] == "1" and run.info.status == "FINISHED"
