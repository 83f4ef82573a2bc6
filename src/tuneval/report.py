"""The leaderboard and its regression check, as pure functions of the runs MLflow holds.

Input: a pipeline's runs as plain dicts (``Tracker.pipeline_runs``: run_id, status, start_time,
tags, metrics). Output: one ``Entry`` per model x benchmark of the latest ``tuneval run``
(tag ``tuneval.invocation``), each compared with the same model x benchmark in the most recent
earlier invocation that has it, and the Markdown / HTML text. No MLflow, no files here.

Regression rule: a metric regressed when it got worse (down, or up for perplexity/loss) by more
than ``sqrt(h_prev**2 + h_new**2)``, the two 95% CI half-widths combined in quadrature: the
normal-approximation 95% CI half-width of the difference of two independent estimates. With a CI on
one side only, that side's half-width; with none, the change is not judged ("no CI").
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from typing import Any

LOWER_IS_BETTER = ("perplexity", "loss")  # metric-name suffixes; every other metric is higher-is-better
CI_SUFFIXES = ("_ci_low", "_ci_high", "_std", "_mean")


def higher_is_better(metric: str) -> bool:
    return not metric.endswith(LOWER_IS_BETTER)


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci_low: float | None = None
    ci_high: float | None = None
    method: str = "none"  # "t" over seeds, "bootstrap" over test examples, "none"

    @property
    def half(self) -> float | None:
        """Half the CI's width (bootstrap intervals need not be symmetric about the mean)."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2


@dataclass(frozen=True)
class Entry:
    """One model x benchmark of one invocation: the seed-group parent run, or the single run."""

    pipeline: str
    model: str
    benchmark: str
    invocation: str
    run_id: str
    started: int  # ms since the epoch (MLflow's start_time)
    seeds: tuple[int, ...]
    n_seeds: int
    stages_ran: tuple[str, ...]  # stages that executed in any of its runs; empty = all cached
    metrics: dict[str, Estimate] = field(default_factory=dict)

    @property
    def cache(self) -> str:
        return "cached" if not self.stages_ran else "ran: " + ", ".join(self.stages_ran)


@dataclass(frozen=True)
class Change:
    model: str
    benchmark: str
    metric: str
    previous: Estimate
    latest: Estimate
    previous_run_id: str
    latest_run_id: str
    worse_by: float  # > 0: the latest is worse, in the metric's own direction
    threshold: float | None  # None: neither side has a CI

    @property
    def regressed(self) -> bool:
        return self.threshold is not None and self.worse_by > self.threshold

    @property
    def verdict(self) -> str:
        if self.threshold is None:
            return "no CI"
        if self.regressed:
            return "REGRESSION"
        return "improved" if -self.worse_by > self.threshold else "within CI"


@dataclass(frozen=True)
class Pair:
    """Model a against model b on one benchmark x metric of the latest invocation (see ``pairs.py``)."""

    benchmark: str
    model_a: str
    model_b: str
    metric: str
    better_by: float | None  # a - b, negated for lower-is-better metrics: > 0 means a is better
    ci_low: float | None  # 95% CI of better_by
    ci_high: float | None
    verdict: str  # "better" | "worse" | "not distinguishable" (a against b) | "not paired (<why>)"
    method: str  # "paired t over N seeds" | "paired bootstrap over N examples" | "-"


@dataclass(frozen=True)
class Report:
    pipeline: str
    latest: list[Entry]
    changes: list[Change]
    invocation: str
    previous_invocations: tuple[str, ...]
    pairs: list[Pair] = field(default_factory=list)  # filled by pairs.compare (needs per-seed runs, predictions)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regressed]


def compare(previous: Estimate, latest: Estimate, metric: str) -> tuple[float, float | None]:
    """(how much worse the latest is, the threshold it must exceed to be a regression)."""
    worse = previous.mean - latest.mean if higher_is_better(metric) else latest.mean - previous.mean
    halves = [h for h in (previous.half, latest.half) if h is not None]
    return worse, (math.sqrt(sum(h * h for h in halves)) if halves else None)


def entries(pipeline: str, runs: list[dict[str, Any]]) -> list[Entry]:
    """Seed-group parents and runs without a parent, of any invocation; children feed their parent's
    cache column. Runs logged before invocation ids existed are skipped."""
    children: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if parent := r["tags"].get("mlflow.parentRunId"):
            children.setdefault(parent, []).append(r)
    out = []
    for r in runs:
        tags, inv = r["tags"], r["tags"].get("tuneval.invocation")
        if not inv or "mlflow.parentRunId" in tags or r["status"] == "RUNNING":
            continue
        group = tags.get("tuneval.kind") == "seed-group"
        if group:
            metrics = _group_metrics(r["metrics"])
            n = int(r["metrics"].get("n_seeds", 0))
            seeds = tuple(int(s) for s in tags.get("tuneval.seeds", "").split(",") if s)
            kids = children.get(r["run_id"], [])
            cache_tags = [c["tags"].get("tuneval.cache", "") for c in kids]
            done = [c for c in kids if c["status"] == "FINISHED"]
            if n == 1 and len(done) == 1:  # one seed survived: its bootstrap CI, as for a one-seed run
                metrics = _single_metrics(done[0]["metrics"]) or metrics
        else:
            if r["status"] != "FINISHED":
                continue
            metrics = _single_metrics(r["metrics"])
            n, seeds = 1, (int(tags["tuneval.seed"]),) if tags.get("tuneval.seed") else ()
            cache_tags = [tags.get("tuneval.cache", "")]
        if not metrics or n == 0:
            continue
        out.append(
            Entry(
                pipeline=pipeline,
                model=tags.get("tuneval.model", "?"),
                benchmark=tags.get("tuneval.benchmark", "?"),
                invocation=inv,
                run_id=r["run_id"],
                started=int(r["start_time"] or 0),
                seeds=seeds,
                n_seeds=n,
                stages_ran=_stages_ran(cache_tags),
                metrics=metrics,
            )
        )
    return out


def _group_metrics(values: dict[str, float]) -> dict[str, Estimate]:
    names = sorted(k[5:-5] for k in values if k.startswith("test_") and k.endswith("_mean"))
    return {
        n: Estimate(
            values[f"test_{n}_mean"],
            values.get(f"test_{n}_ci_low"),
            values.get(f"test_{n}_ci_high"),
            "t" if f"test_{n}_ci_low" in values else "none",
        )
        for n in names
    }


def _single_metrics(values: dict[str, float]) -> dict[str, Estimate]:
    names = sorted(k[5:] for k in values if k.startswith("test_") and not k.endswith(CI_SUFFIXES))
    return {
        n: Estimate(
            values[f"test_{n}"],
            values.get(f"test_{n}_ci_low"),
            values.get(f"test_{n}_ci_high"),
            "bootstrap" if f"test_{n}_ci_low" in values else "none",
        )
        for n in names
    }


def _stages_ran(cache_tags: list[str]) -> tuple[str, ...]:
    ran: list[str] = []
    for tag in cache_tags:
        for part in filter(None, tag.split(",")):
            stage, _, status = part.partition("=")
            if status != "cached" and stage not in ran:
                ran.append(stage)
    return tuple(ran)


def build(pipeline: str, runs: list[dict[str, Any]]) -> Report | None:
    """The latest invocation's entries and their changes since the previous one (None: no entries)."""
    found = entries(pipeline, runs)
    if not found:
        return None
    started: dict[str, int] = {}
    for e in found:
        started[e.invocation] = min(started.get(e.invocation, e.started), e.started)
    order = sorted(started, key=lambda inv: (started[inv], inv))
    latest_inv = order[-1]
    latest = sorted((e for e in found if e.invocation == latest_inv), key=lambda e: (e.benchmark, e.model))
    changes: list[Change] = []
    used: list[str] = []
    for e in latest:
        earlier = [p for p in found if (p.model, p.benchmark) == (e.model, e.benchmark) and p.invocation != latest_inv]
        if not earlier:
            continue
        prev = max(earlier, key=lambda p: (started[p.invocation], p.invocation))
        if prev.invocation not in used:
            used.append(prev.invocation)
        for name, est in e.metrics.items():
            if name in prev.metrics:
                worse, threshold = compare(prev.metrics[name], est, name)
                changes.append(
                    Change(e.model, e.benchmark, name, prev.metrics[name], est, prev.run_id, e.run_id, worse, threshold)
                )
    return Report(pipeline, latest, changes, latest_inv, tuple(used))


# ---- rendering ----


def fmt(x: float) -> str:
    """Four decimals for 0-1 scores, fewer for BLEU-like (0-100) and perplexity-like values."""
    a = abs(x)
    return f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 10 else f"{x:.4f}"


def like(x: float, ref: float) -> str:
    """x with as many decimals as ``fmt(ref)`` shows."""
    return f"{x:.{len(fmt(ref).partition('.')[2])}f}"


def mean_ci(e: Estimate) -> str:
    """``mean ± half-width`` with the mean's decimals; just the mean without a CI."""
    return fmt(e.mean) if e.half is None else f"{fmt(e.mean)} ± {like(e.half, e.mean)}"


def _date(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def _columns(report: Report) -> list[tuple[str, str]]:
    return sorted({(e.benchmark, m) for e in report.latest for m in e.metrics})


def _arrow(metric: str) -> str:
    return "↑" if higher_is_better(metric) else "↓"


def _seeds(e: Entry) -> str:
    text = ",".join(map(str, e.seeds)) or "?"
    return text if e.n_seeds == len(e.seeds) else f"{text} ({e.n_seeds} completed)"


def _method(e: Entry, est: Estimate) -> str:
    return {"t": f"t over {e.n_seeds} seeds", "bootstrap": "bootstrap over examples"}.get(est.method, "none")


def leaderboard_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Models x (benchmark, metric) cells ``mean ± CI``; a regressed cell is marked."""
    cols = _columns(report)
    flagged = {(c.model, c.benchmark, c.metric) for c in report.regressions}
    head = ["model", *[f"{b} {m} {_arrow(m)}" for b, m in cols]]
    models = sorted({e.model for e in report.latest})
    by = {(e.model, e.benchmark): e for e in report.latest}
    rows = []
    for model in models:
        cells = [model]
        for bench, metric in cols:
            e = by.get((model, bench))
            est = e.metrics.get(metric) if e else None
            cell = "-" if est is None else mean_ci(est)
            cells.append(cell + (" (regressed)" if (model, bench, metric) in flagged else ""))
        rows.append(cells)
    return head, rows


def detail_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    head = [
        "model",
        "benchmark",
        "metric",
        "mean ± CI",
        "95% CI",
        "CI method",
        "seeds",
        "date (UTC)",
        "cache",
        "previous",
        "change",
        "verdict",
    ]
    changes = {(c.model, c.benchmark, c.metric): c for c in report.changes}
    rows = []
    for e in report.latest:
        for name, est in e.metrics.items():
            c = changes.get((e.model, e.benchmark, name))
            ci = "-"
            if est.ci_low is not None and est.ci_high is not None:
                ci = f"[{like(est.ci_low, est.mean)}, {like(est.ci_high, est.mean)}]"
            rows.append(
                [
                    e.model,
                    e.benchmark,
                    f"{name} {_arrow(name)}",
                    mean_ci(est),
                    ci,
                    _method(e, est),
                    _seeds(e),
                    _date(e.started),
                    e.cache,
                    mean_ci(c.previous) if c else "-",
                    ("+" if est.mean >= c.previous.mean else "") + like(est.mean - c.previous.mean, est.mean)
                    if c
                    else "-",
                    c.verdict if c else "first run",
                ]
            )
    return head, rows


def pair_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    head = ["benchmark", "metric", "A", "B", "A better by", "95% CI", "verdict (A vs B)", "method"]
    rows = []
    for p in report.pairs:
        diff = ci = "-"
        if p.better_by is not None:
            diff = ("+" if p.better_by >= 0 else "") + fmt(p.better_by)
        if p.ci_low is not None and p.ci_high is not None and p.better_by is not None:
            ci = f"[{like(p.ci_low, p.better_by)}, {like(p.ci_high, p.better_by)}]"
        rows.append(
            [p.benchmark, f"{p.metric} {_arrow(p.metric)}", p.model_a, p.model_b, diff, ci, p.verdict, p.method]
        )
    return head, rows


PAIRS_INTRO = (
    "Each pair of models on a benchmark of the latest run. 'A better by' is A − B for ↑ metrics and B − A "
    "for ↓ metrics, so > 0 favours A; the verdict is 'better' or 'worse' when its 95% CI excludes 0. With two "
    "or more seeds in common: a paired t-interval over the per-seed differences; otherwise a paired percentile "
    "bootstrap over the test examples (the same resampled examples for both models, each metric recomputed "
    "as the corpus metric)."
)


def summary_lines(report: Report) -> list[str]:
    if not report.previous_invocations:
        lines = ["No earlier run of this pipeline to compare with."]
    elif report.regressions:
        lines = [f"**{len(report.regressions)} regression(s)** since the previous run:"]
    else:
        lines = ["No regression since the previous run."]
    for c in report.regressions:
        lines.append(
            f"- {c.model} / {c.benchmark} / {c.metric}: {mean_ci(c.previous)} -> {mean_ci(c.latest)} "
            f"(worse by {c.worse_by:.4g} > threshold {c.threshold:.4g})"
        )
    return lines


def _intro(report: Report) -> str:
    prev = ", ".join(f"`{p}`" for p in report.previous_invocations) or "none"
    return (
        f"Latest `tuneval run`: `{report.invocation}`; compared with: {prev}. "
        "Mean ± half-width of the 95% CI: t-interval over seeds, or percentile bootstrap over test "
        "examples for one seed. A regression is a drop larger than the two runs' half-widths combined "
        "in quadrature (↑ higher is better, ↓ lower is better)."
    )


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]
    return [
        "| " + " | ".join(esc[0]) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(r) + " |" for r in esc[1:]),
    ]


def markdown(report: Report, chart: str | None = "report.png") -> str:
    lines = [f"# tuneval report: {report.pipeline}", "", _intro(report), "", *summary_lines(report), ""]
    lines += ["## Leaderboard", "", *_md_table(*leaderboard_rows(report)), ""]
    if chart:
        lines += [f"![mean and 95% CI per model]({chart})", ""]
    lines += ["## Details", "", *_md_table(*detail_rows(report)), ""]
    if report.pairs:
        lines += ["## Pairwise comparisons", "", PAIRS_INTRO, "", *_md_table(*pair_rows(report)), ""]
    return "\n".join(lines)


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
    "th{background:#f4f4f4}.regressed{background:#fdd;font-weight:bold}img{max-width:100%}"
)


def _html_table(head: list[str], rows: list[list[str]], regressed_col: int | None = None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    bad = ' class="regressed"'
    for r in rows:
        row = bad if regressed_col is not None and r[regressed_col] == "REGRESSION" else ""
        cells = "".join(f"<td{bad if '(regressed)' in c else ''}>{html.escape(c)}</td>" for c in r)
        out.append(f"<tr{row}>{cells}</tr>")
    return "\n".join([*out, "</table>"])


def to_html(report: Report, chart: str | None = "report.png") -> str:
    summary = summary_lines(report)
    items = "".join(f"<li>{html.escape(s[2:])}</li>" for s in summary[1:])
    head, rows = detail_rows(report)
    parts = [
        "<!doctype html>",
        f'<html><head><meta charset="utf-8"><title>tuneval report: {html.escape(report.pipeline)}</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tuneval report: {html.escape(report.pipeline)}</h1>",
        f"<p>{html.escape(_intro(report)).replace('`', '')}</p>",
        f"<p>{html.escape(summary[0].replace('**', ''))}</p>" + (f"<ul>{items}</ul>" if items else ""),
        "<h2>Leaderboard</h2>",
        _html_table(*leaderboard_rows(report)),
        f'<img src="{html.escape(chart)}" alt="mean and 95% CI per model">' if chart else "",
        "<h2>Details</h2>",
        _html_table(head, rows, regressed_col=head.index("verdict")),
        *(
            ["<h2>Pairwise comparisons</h2>", f"<p>{html.escape(PAIRS_INTRO)}</p>", _html_table(*pair_rows(report))]
            if report.pairs
            else []
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
