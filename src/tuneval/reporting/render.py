"""The leaderboard as text: Markdown and HTML tables of a ``rules.Report`` (pure, no I/O)."""

from __future__ import annotations

import html
import time

from tuneval.reporting.rules import Entry, Estimate, Report, higher_is_better


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


TREND_INTRO = "Each benchmark x metric over the last invocations: a line per model, its 95% CI as a band."


def markdown(report: Report, chart: str | None = "report.png", trend: str | None = None) -> str:
    lines = [f"# tuneval report: {report.pipeline}", "", _intro(report), "", *summary_lines(report), ""]
    lines += ["## Leaderboard", "", *_md_table(*leaderboard_rows(report)), ""]
    if chart:
        lines += [f"![mean and 95% CI per model]({chart})", ""]
    if trend:
        lines += ["## Trend", "", TREND_INTRO, "", f"![the last invocations]({trend})", ""]
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


def to_html(report: Report, chart: str | None = "report.png", trend: str | None = None) -> str:
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
        *(
            ["<h2>Trend</h2>", f"<p>{TREND_INTRO}</p>", f'<img src="{html.escape(trend)}" alt="the last invocations">']
            if trend
            else []
        ),
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
