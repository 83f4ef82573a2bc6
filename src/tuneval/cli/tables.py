"""The results tables `tuneval run` prints."""

from __future__ import annotations

from typing import Any


def results_table(results: list[dict[str, Any]]) -> str:
    metric_names = sorted({k for r in results for k in (r.get("metrics") or {})})
    head = ["pipeline", "model", "benchmark", "seed", "status", "stages", *metric_names]
    rows = [head]
    for r in results:
        stages = " ".join(f"{s[:4]}:{v['status'][:3]}" for s, v in (r.get("stages") or {}).items())
        rows.append(
            [
                str(r.get("pipeline", "")),
                str(r.get("model", "")),
                str(r.get("benchmark", "")),
                str(r.get("seed", "")),
                str(r.get("status", "")),
                stages,
                *[f"{r['metrics'][m]:.4f}" if m in (r.get("metrics") or {}) else "-" for m in metric_names],
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(groups: list[dict[str, Any]]) -> str:
    """Mean and 95% t-interval over seeds, one line per pipeline x model x benchmark x metric."""
    lines = ["", "over seeds (mean [95% CI], t-interval):"]
    for g in groups:
        for name, s in g["metrics"].items():
            ci = f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]" if s["ci_low"] is not None else "(one seed)"
            lines.append(
                f"  {g['pipeline']}  {g['model']}  {g['benchmark']}  {name}: {s['mean']:.4f} {ci}  "
                f"std {s['std']:.4f}  n={s['n']}"
            )
    return "\n".join(lines)
