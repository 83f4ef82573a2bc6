"""Statistics over seeds and examples: is a difference between two models real?

- Over seeds: mean, sample standard deviation and a Student-t confidence interval.
- With one seed: a percentile bootstrap over test examples (per-example scores).
- Two models on the same benchmark: a paired bootstrap over examples (same resamples for both),
  verdict "better" / "worse" / "not distinguishable" from whether the CI of the difference holds 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    n: int
    ci_low: float | None
    ci_high: float | None
    method: str  # "t" over seeds, "bootstrap" over examples, "none"
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def over_seeds(values: list[float], confidence: float = 0.95) -> Summary:
    """Mean +- t-interval across seeds (sample std, n-1 degrees of freedom)."""
    if not values:
        raise ValueError("no values")
    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(x.mean())
    if n == 1:
        return Summary(mean, 0.0, 1, None, None, "none", confidence)
    from scipy.stats import t

    std = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, n, mean - half, mean + half, "t", confidence)


def bootstrap(per_example: list[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Summary:
    """Percentile bootstrap CI of the mean of per-example scores (e.g. 0/1 correctness)."""
    x = np.asarray(per_example, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Summary(
        float(x.mean()),
        float(x.std(ddof=1)) if len(x) > 1 else 0.0,
        1,
        float(low),
        float(high),
        "bootstrap",
        confidence,
    )


@dataclass(frozen=True)
class Comparison:
    difference: float  # mean(a) - mean(b)
    ci_low: float
    ci_high: float
    verdict: str  # "better" | "worse" | "not distinguishable" (a relative to b)
    method: str
    confidence: float


def paired_bootstrap(
    a: list[float], b: list[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Comparison:
    """a and b score the same examples in the same order; each resample draws the same rows for both."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired scores need the same examples ({len(xa)} vs {len(xb)})")
    d = xa - xb
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = (float(v) for v in np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2]))
    return Comparison(float(d.mean()), low, high, _verdict(low, high), "paired bootstrap", confidence)


def paired_over_seeds(a: list[float], b: list[float], confidence: float = 0.95) -> Comparison:
    """Paired t-interval on per-seed differences (seed i of a against seed i of b)."""
    s = over_seeds([x - y for x, y in zip(a, b, strict=True)], confidence)
    if s.ci_low is None or s.ci_high is None:
        raise ValueError("a paired comparison over seeds needs at least two seeds")
    return Comparison(s.mean, s.ci_low, s.ci_high, _verdict(s.ci_low, s.ci_high), "paired t over seeds", confidence)


def verdict(low: float, high: float) -> str:
    """a against b from the CI of a - b (in the direction where larger is better)."""
    return _verdict(low, high)


def _verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not distinguishable"
