"""Dispatch pieces without servers: seed groups as references, heartbeats and the lost-worker rule,
results read back (or a failed result per seed saying why), worker pinning, and the command line's
user errors (one line, exit 2)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneval.cli.main import main
from tuneval.errors import TunevalError
from tuneval.pipeline import groups


def test_groups_keep_their_seeds_together(project: Path) -> None:
    from tuneval.config import load_config, resolve_runs

    cfg = project / "pipelines.yaml"
    cfg.write_text(cfg.read_text().replace("seeds: [1]", "seeds: [1, 2]").replace("[tiny]", "[tiny, tiny-gpt2]"))
    runs = resolve_runs(load_config(cfg), ["smoke"])
    refs = groups.groups_of(runs)
    assert [(r.model, r.seeds) for r in refs] == [("tiny", (1, 2)), ("tiny-gpt2", (1, 2))]
    assert [r.seed for r in groups.select(runs, refs[1])] == [1, 2]
    stale = groups.GroupRef("smoke", "tiny", "toy", (1, 7))
    with pytest.raises(TunevalError, match=r"missing \[7\].*share one"):
        groups.select(runs, stale)


def test_heartbeat_beats_then_goes(tmp_path: Path) -> None:
    path = tmp_path / "inv" / "g.beat"
    with groups.heartbeat(path, {"attempt": 1}, every=0.05):
        while (first := groups.read_json(path)) is None:
            time.sleep(0.01)
        time.sleep(0.3)
        later = groups.read_json(path)
        assert first and later and later["n"] > first["n"] and later["attempt"] == 1
        assert later["pid"] == first["pid"] and "cuda_visible_devices" in later
    assert not path.exists()


def test_a_worker_counts_as_lost_only_after_its_beat_stops(tmp_path: Path, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(groups.time, "monotonic", lambda: clock[0])
    path, watch = tmp_path / "g.beat", groups.BeatWatch(lost_after=10)
    assert watch.lost(path) is None  # no beat yet: a run still starting, never "lost"
    for n in range(1, 4):
        path.write_text(json.dumps({"n": n, "pid": 5}))
        clock[0] += 8
        assert watch.lost(path) is None  # changed since the last look
    clock[0] += 9
    assert watch.lost(path) is None  # unchanged for 9 s
    clock[0] += 2
    assert watch.lost(path) == {"n": 3, "pid": 5}  # unchanged for 11 s
    path.write_text(json.dumps({"n": 1, "pid": 6}))  # a retry's new process: a fresh start
    assert watch.lost(path) is None
    path.unlink()  # gone without a result (a killed retry): lost once the time has passed
    clock[0] += 11
    assert watch.lost(path) == {"n": 1, "pid": 6}


def _run(state: object) -> SimpleNamespace:
    return SimpleNamespace(id="fr-1", state=state)


def test_results_come_from_the_shared_cache_or_say_why_not(tmp_path: Path) -> None:
    from prefect.states import Completed, Failed
    from tuneval.flows.dispatch import collect

    from tuneval.settings import Settings

    settings = Settings.from_env(tmp_path)
    ref = groups.GroupRef("p", "m", "b", (1, 2))
    [one, two] = collect(ref, _run(Failed(message="worker could not load pipelines.yaml")), settings)
    assert (one["seed"], two["seed"], one["status"]) == (1, 2, "failed")
    assert "failed on pool: worker could not load pipelines.yaml" in one["error"]
    [lost, _] = collect(ref, _run(Completed()), settings)
    assert "not visible here" in lost["error"] and "TUNEVAL_CACHE_DIR" in lost["error"]
    done = {"pipeline": "p", "model": "m", "benchmark": "b", "status": "completed", "metrics": {"accuracy": 1.0}}
    groups.write_result(settings, ref, [{**done, "seed": 1}, {"run": "m__b__seed2", "status": "failed"}], {})
    [ok, failed] = collect(ref, _run(Failed()), settings)
    assert ok["metrics"] == {"accuracy": 1.0} and ok["dispatch"] == {"flow_run_id": "fr-1", "state": "FAILED"}
    assert (failed["seed"], failed["model"], failed["status"]) == (2, "m", "failed")  # filled in from the group


def test_workers_are_pinned_one_device_each(monkeypatch) -> None:
    from tuneval.flows import workers

    monkeypatch.setattr(workers, "visible_gpus", lambda: ["3", "5"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in workers.plan_local("auto")] == ["3", "5"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in workers.plan_local("1")] == ["3"]
    assert "OMP_NUM_THREADS" not in workers.plan_local("2")[0]  # a GPU run keeps torch's own threads
    with pytest.raises(TunevalError, match="only 2 GPUs"):
        workers.plan_local("3")
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    monkeypatch.setattr(workers, "cores", lambda: 8)
    cpu = workers.plan_local("2")
    assert [(e["CUDA_VISIBLE_DEVICES"], e["OMP_NUM_THREADS"]) for e in cpu] == [("0", "4"), ("1", "4")]
    with pytest.raises(TunevalError, match="no GPU is visible"):
        workers.plan_local("auto")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["run", "--workers", "0"], {}, "give a positive number of workers"),
        (["run", "--workers", "2", "--pool", "gpu"], {}, "--workers and --pool: pick one"),
        (["run", "--invocation", "20261126T074000Z-3f9a1c"], {}, "use it with --pool"),
        (["run", "--pool", "gpu", "--invocation", "yesterday"], {}, "expected an id like"),
        (["run", "--pool", "gpu"], {"TUNEVAL_WORKER_LOST_SECONDS": "soon"}, "TUNEVAL_WORKER_LOST_SECONDS='soon'"),
        (["run", "--pool", "gpu", "--force", "score", "--no-track"], {}, "PREFECT_API_URL is not set"),
        (
            ["run", "--pool", "gpu", "--force", "score", "--no-track"],
            {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
            "cannot be reached",
        ),
        (["run", "--retries", "-1"], {}, "give a count"),
        (["worker", "--pool", "gpu"], {}, "PREFECT_API_URL is not set"),
        (["worker", "--pool", "gpu"], {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, "cannot be reached"),
        (["worker", "--pool", "gpu", "--gpus", "0,x"], {}, "distinct GPU ids"),
        (["worker"], {}, "--pool"),
    ],
)
def test_user_errors(project: Path, capsys, monkeypatch, argv: list[str], env: dict[str, str], message: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    exits = argv[-1] in ("0", "-1", "0,x") or argv == ["worker"]  # argparse's own errors
    # Prefect reads its settings once per process: an in-process run needs them set for it too.
    with temporary_settings({PREFECT_API_URL: env.get("PREFECT_API_URL")}):
        with pytest.raises(SystemExit) if exits else _nothing() as exc:
            code = main([*argv, "--config", str(project / "pipelines.yaml")])
    code = exc.value.code if exc is not None else code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_dispatch_pool_is_validated_like_every_key(project: Path, capsys) -> None:
    cfg = project / "pipelines.yaml"
    cfg.write_text(cfg.read_text() + "    dispatch: {pool: [gpu], when: always}\n")
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "pipelines.yaml:16: pipelines.smoke.dispatch.pool: Input should be a valid string" in err, err
    assert "pipelines.smoke.dispatch.when: unknown key" in err
    cfg.write_text(cfg.read_text().replace("{pool: [gpu], when: always}", "{pool: gpu-a100}"))
    assert main(["check", "--config", str(cfg)]) == 0


def test_a_scheduled_pipeline_with_dispatch_fans_its_groups_out(project: Path, monkeypatch) -> None:
    """`dispatch: {pool: NAME}` makes the scheduled flow submit one group per model x benchmark there."""
    import tuneval.flows.deployments as deployments
    import tuneval.flows.dispatch as dispatch

    cfg = project / "pipelines.yaml"
    text = cfg.read_text().replace("seeds: [1]", "seeds: [1, 2]").replace("models: [tiny]", "models: [tiny, tiny-gpt2]")
    cfg.write_text(text + "    dispatch: {pool: gpu-a}\n")
    seen = {}

    def fake(groups, settings, force, how):  # what the real flow would submit
        seen.update(groups=groups, how=how, invocation=settings.invocation)
        return [{"status": "completed"} for g in groups for _ in g.seeds]

    monkeypatch.setattr(deployments, "check_pool", lambda pool: seen.setdefault("checked", pool))
    monkeypatch.setattr(dispatch, "dispatch_flow", fake)
    results = deployments.pipeline_flow.fn(str(cfg), "smoke")
    assert len(results) == 4 and seen["checked"] == "gpu-a"
    assert [(g.model, g.seeds) for g in seen["groups"]] == [("tiny", (1, 2)), ("tiny-gpt2", (1, 2))]
    assert (seen["how"].pool, seen["how"].config, seen["how"].source) == ("gpu-a", "pipelines.yaml", str(project))
