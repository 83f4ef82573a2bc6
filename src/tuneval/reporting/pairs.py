"""Paired comparison of two models on the same benchmark: the report's "Pairwise comparisons" section.

For each benchmark of the latest invocation with two or more models, each pair of models and each
metric both have: how much better model A is than model B (A − B, or B − A for lower-is-better
metrics), its 95% CI and a verdict from the CI (better / worse / not distinguishable).

- Two or more completed seeds in common: ``stats.paired_over_seeds`` on the per-seed test metrics
  of the child runs, matched by ``tuneval.seed`` (pairing by seed removes the variance the two
  models share through the seed's data order and head initialisation).
- Otherwise: a paired percentile bootstrap over the test examples of one run per model (the common
  seed, else each model's lowest seed). Rows are matched by ``example_id``; every resample draws the
  same examples for both models and recomputes each metric as the corpus metric from
  ``example_ci.decompose``, so macro-F1, BLEU or perplexity are resampled exactly as their CI is.

Pure: the predictions come through ``examples(run_id)``, which the caller (``leaderboard.py``) backs
with MLflow artifacts. Metrics without per-example form (``pretrained_perplexity``) or runs without
predictions are listed as "not paired (...)".
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np

from tuneval.reporting import example_ci, stats
from tuneval.reporting.rules import Entry, Pair, Report, higher_is_better

RESAMPLES = 1000
# run_id -> (predictions table, run params) or None when the run logged no predictions.
Examples = Callable[[str], tuple[dict[str, list[Any]], dict[str, str]] | None]


def compare(report: Report, runs: list[dict[str, Any]], examples: Examples | None) -> list[Pair]:
    by_id = {r["run_id"]: r for r in runs}
    kids: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if parent := r["tags"].get("mlflow.parentRunId"):
            kids.setdefault(parent, []).append(r)
    loaded: dict[str, Any] = {}

    def load(run_id: str) -> Any:
        if run_id not in loaded:
            loaded[run_id] = examples(run_id) if examples else None
        return loaded[run_id]

    out: list[Pair] = []
    benches = sorted({e.benchmark for e in report.latest})
    for bench in benches:
        group = sorted((e for e in report.latest if e.benchmark == bench), key=lambda e: e.model)
        for a, b in combinations(group, 2):
            sa, sb = _seed_runs(a, by_id, kids), _seed_runs(b, by_id, kids)
            for metric in sorted(set(a.metrics) & set(b.metrics)):
                out.append(_pair(bench, a, b, metric, sa, sb, load))
    return out


def _seed_runs(e: Entry, by_id: dict[str, dict[str, Any]], kids: dict[str, list[dict[str, Any]]]) -> dict[int, Any]:
    """seed -> its finished run (the children of a seed group, or the single run itself)."""
    runs = [r for r in kids.get(e.run_id, []) if r["status"] == "FINISHED"] or [by_id[e.run_id]]
    return {int(r["tags"]["tuneval.seed"]): r for r in runs if r["tags"].get("tuneval.seed", "").lstrip("-").isdigit()}


def _pair(bench: str, a: Entry, b: Entry, metric: str, sa: dict, sb: dict, load: Callable[[str], Any]) -> Pair:
    key = f"test_{metric}"
    common = sorted(s for s in set(sa) & set(sb) if key in sa[s]["metrics"] and key in sb[s]["metrics"])
    if len(common) >= 2:
        va, vb = [sa[s]["metrics"][key] for s in common], [sb[s]["metrics"][key] for s in common]
        c = stats.paired_over_seeds(va, vb) if higher_is_better(metric) else stats.paired_over_seeds(vb, va)
        return Pair(bench, a.model, b.model, metric, c.difference, c.ci_low, c.ci_high, c.verdict, _t(len(common)))
    ra = sa[common[0]] if common else (sa[min(sa)] if sa else None)
    rb = sb[common[0]] if common else (sb[min(sb)] if sb else None)
    la = load(ra["run_id"]) if ra else None
    lb = load(rb["run_id"]) if rb else None
    if la is None or lb is None:
        return _not_paired(bench, a, b, metric, "no predictions")
    problem = ra["tags"].get("tuneval.problem", "")
    if problem != rb["tags"].get("tuneval.problem", ""):
        return _not_paired(bench, a, b, metric, "different problems")
    (ta, pa), (tb, _) = la, lb
    ta, tb = _align(ta, tb)
    if ta is None or tb is None or len(next(iter(ta.values()), [])) < 2:
        return _not_paired(bench, a, b, metric, "no common test examples")
    info = _info(pa, ta, tb)
    try:
        da = example_ci.decompose(problem, metric, ta, info)
        db = example_ci.decompose(problem, metric, tb, info)
    except (KeyError, ValueError, IndexError) as e:
        return _not_paired(bench, a, b, metric, f"cannot read predictions: {type(e).__name__}")
    if da is None or db is None:
        return _not_paired(bench, a, b, metric, "no per-example form")
    diff, low, high = paired_decomposed(da, db, higher_is_better(metric))
    verdict = "not distinguishable" if low is None or high is None else stats.verdict(low, high)
    method = f"paired bootstrap over {len(da[0])} examples"
    return Pair(bench, a.model, b.model, metric, diff, low, high, verdict, method)


def _t(n: int) -> str:
    return f"paired t over {n} seeds"


def _not_paired(bench: str, a: Entry, b: Entry, metric: str, why: str) -> Pair:
    return Pair(bench, a.model, b.model, metric, None, None, None, f"not paired ({why})", "-")


def paired_decomposed(
    a: example_ci.Decomposed,
    b: example_ci.Decomposed,
    higher: bool,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float | None, float | None]:
    """(a better by, CI low, CI high) with the same multinomial example counts for both models."""
    (xa, fa), (xb, fb) = a, b
    sign = 1.0 if higher else -1.0
    point = sign * float(fa(xa.sum(axis=0, keepdims=True))[0] - fb(xb.sum(axis=0, keepdims=True))[0])
    n = len(xa)
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, example_ci.CHUNK):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(example_ci.CHUNK, resamples - start)).astype(float)
        diffs.append(sign * (fa(counts @ xa) - fb(counts @ xb)))
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    if not len(d):
        return point, None, None
    low, high = (float(v) for v in np.quantile(d, [0.5 - confidence / 2, 0.5 + confidence / 2]))
    return point, low, high


def _align(
    ta: dict[str, list[Any]], tb: dict[str, list[Any]]
) -> tuple[dict[str, list[Any]] | None, dict[str, list[Any]] | None]:
    """Both tables restricted to their common example_ids, in A's order."""
    ia, ib = ta.get("example_id"), tb.get("example_id")
    if ia is None or ib is None or len(set(ia)) != len(ia) or len(set(ib)) != len(ib):
        # Without unique ids the rows can only be paired by position, and only when the tables agree in length.
        same = len(next(iter(ta.values()), [])) == len(next(iter(tb.values()), []))
        return (ta, tb) if same else (None, None)
    pos_b = {x: i for i, x in enumerate(ib)}
    keep_a = [i for i, x in enumerate(ia) if x in pos_b]
    keep_b = [pos_b[ia[i]] for i in keep_a]
    return {k: [v[i] for i in keep_a] for k, v in ta.items()}, {k: [v[i] for i in keep_b] for k, v in tb.items()}


def _info(params: dict[str, str], ta: dict[str, list[Any]], tb: dict[str, list[Any]]) -> dict[str, Any]:
    """What ``decompose`` needs of the prepared data's info, from the run's ``data_info.*`` params."""
    info: dict[str, Any] = {}
    try:
        info["label_names"] = list(ast.literal_eval(params["data_info.label_names"]))
    except (KeyError, ValueError, SyntaxError, TypeError):
        if "label" in ta:  # params missing or truncated: every label id seen in either run
            ids = [int(x) for t in (ta, tb) for col in ("label", "prediction") for x in t.get(col, [])]
            info["label_names"] = [str(i) for i in range(max(ids, default=-1) + 1)]
    v2 = params.get("data_info.postprocess.version_2_with_negative", "False") == "True"
    info["postprocess"] = {"version_2_with_negative": v2}
    return info
