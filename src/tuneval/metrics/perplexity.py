"""Perplexity from stored per-example teacher-forced NLL: exp(sum of NLL / sum of tokens).

Per token over the whole corpus (not a mean of per-example perplexities), natural log. The NLL
sums and token counts come from the predict stage (labels != -100: target tokens and eos; for
decoder-only models the prompt never counts).
"""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus perplexity from per-example NLL sums and token counts.",
            citation="",
            inputs_description="nll_sums: per-example summed NLL in nats; token_counts: target tokens per example",
            features=datasets.Features(
                {"nll_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll_sums: list[float], token_counts: list[int]) -> dict[str, float]:
        total = sum(token_counts)
        return {"perplexity": math.exp(sum(nll_sums) / total) if total else float("nan")}
