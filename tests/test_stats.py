"""Statistics on hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneval.reporting import stats

CASES = json.loads((Path(__file__).parent / "fixtures" / "stats_cases.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_t_interval_over_seeds(case: dict) -> None:
    s = stats.over_seeds(case["values"])
    assert s.mean == pytest.approx(case["mean"])
    assert s.std == pytest.approx(case["std"], abs=1e-12)
    assert s.ci_low == pytest.approx(case["ci_low"], abs=1e-6)
    assert s.ci_high == pytest.approx(case["ci_high"], abs=1e-6)
    assert s.method == "t" and s.n == len(case["values"])


def test_one_seed_has_no_t_interval() -> None:
    s = stats.over_seeds([0.8])
    assert (s.n, s.ci_low, s.method) == (1, None, "none")


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    correct = [1.0] * 80 + [0.0] * 20
    a, b = stats.bootstrap(correct, seed=1), stats.bootstrap(correct, seed=1)
    assert a == b and a.mean == 0.8
    assert a.ci_low < 0.8 < a.ci_high
    # Normal approximation: 0.8 +- 1.96 * sqrt(0.16 / 100) = 0.8 +- 0.078
    assert a.ci_low == pytest.approx(0.722, abs=0.03) and a.ci_high == pytest.approx(0.878, abs=0.03)


def test_paired_bootstrap_verdicts() -> None:
    better = stats.paired_bootstrap([1.0] * 50, [0.0] * 50)
    assert (better.difference, better.ci_low, better.ci_high, better.verdict) == (1.0, 1.0, 1.0, "better")
    assert stats.paired_bootstrap([0.0] * 50, [1.0] * 50).verdict == "worse"
    same = [1.0, 0.0] * 50
    tie = stats.paired_bootstrap(same, same)
    assert tie.difference == 0 and tie.verdict == "not distinguishable"
    # 3 wins and 2 losses in 100 paired examples: too few to call.
    a = [1.0] * 3 + [0.0] * 2 + [1.0] * 95
    b = [0.0] * 3 + [1.0] * 2 + [1.0] * 95
    assert stats.paired_bootstrap(a, b).verdict == "not distinguishable"
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0], [1.0, 0.0])


def test_paired_over_seeds() -> None:
    c = stats.paired_over_seeds([0.90, 0.91, 0.92], [0.80, 0.80, 0.81])
    # differences 0.10, 0.11, 0.11: mean 0.106667, s = 0.0057735, t(0.975,2) = 4.3026527
    assert c.difference == pytest.approx(0.1066667, abs=1e-6)
    assert c.ci_low == pytest.approx(0.1066667 - 4.3026527 * 0.0057735 / 3**0.5, abs=1e-6)
    assert c.verdict == "better"


def test_results_are_summarized_per_model_and_benchmark() -> None:
    from tuneval.tracking.record import summarize

    def run(model: str, seed: int, acc: float, status: str = "completed") -> dict:
        return {
            "pipeline": "p",
            "model": model,
            "benchmark": "b",
            "seed": seed,
            "status": status,
            "metrics": {"accuracy": acc},
        }

    groups = summarize([run("m1", 1, 0.8), run("m1", 2, 0.9), run("m2", 1, 0.5), run("m1", 3, 0.1, "failed")])
    by_model = {g["model"]: g for g in groups}
    assert by_model["m1"]["seeds"] == [1, 2]  # the failed seed is left out
    assert by_model["m1"]["metrics"]["accuracy"]["mean"] == pytest.approx(0.85)
    assert by_model["m2"]["metrics"]["accuracy"]["n"] == 1
