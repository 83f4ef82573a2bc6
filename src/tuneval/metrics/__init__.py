"""Metric modules in the ``evaluate`` style, loaded offline from this package.

``evaluate.load("accuracy")`` needs the Hub; these modules are the same kind of object,
instantiated from the files beside this one.
"""

from __future__ import annotations

import importlib
from typing import Any

# metric name -> (module, class, config name)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "accuracy": ("accuracy", "Accuracy", "default"),
    "f1": ("macro_prf", "MacroPRF", "f1"),
    "precision": ("macro_prf", "MacroPRF", "precision"),
    "recall": ("macro_prf", "MacroPRF", "recall"),
    "rouge1": ("rouge", "Rouge", "rouge1"),
    "rouge2": ("rouge", "Rouge", "rouge2"),
    "rougeL": ("rouge", "Rouge", "rougeL"),
    "rougeLsum": ("rouge", "Rouge", "rougeLsum"),
    "bleu": ("sacrebleu_metrics", "SacreBleu", "bleu"),
    "chrf": ("sacrebleu_metrics", "SacreBleu", "chrf"),
    "perplexity": ("perplexity", "Perplexity", "default"),
}
# A problem kind whose metric shares a name with another kind's ("f1") overrides it here.
PROBLEM_REGISTRY: dict[str, dict[str, tuple[str, str, str]]] = {
    "extractive_qa": {
        "exact_match": ("squad", "Squad", "exact_match"),
        "f1": ("squad", "Squad", "f1"),
    },
}

# What each metric computes, recorded on every run and part of the score stage's cache key.
# Kept here, not in the modules, so a cached score stage never imports evaluate (~10 s).
_MACRO = {"library": "scikit-learn precision_recall_fscore_support", "average": "macro", "zero_division": 0}
SETTINGS: dict[str, dict[str, Any]] = {
    "accuracy": {"library": "scikit-learn accuracy_score", "normalize": True},
    "f1": _MACRO,
    "precision": _MACRO,
    "recall": _MACRO,
}
_SQUAD = {
    "library": "official SQuAD v1.1 evaluate script (normalize_answer, f1_score, exact_match_score)",
    "normalize": "lower-case, drop string.punctuation, drop articles a/an/the, collapse white space",
    "aggregate": "max over gold answers, mean over questions, x 100",
}
_ROUGE = {
    "library": "rouge-score RougeScorer",
    "use_stemmer": True,
    "score": "F-measure, mean over examples, scale 0-1",
    "tokenizer": "rouge-score default (lowercase, non-alphanumerics removed)",
    "rougeLsum_sentences": "regex split after . ! ? followed by whitespace, joined by newlines (no nltk punkt)",
}
SETTINGS.update(
    {
        "rouge1": _ROUGE,
        "rouge2": _ROUGE,
        "rougeL": _ROUGE,
        "rougeLsum": _ROUGE,
        "perplexity": {
            "definition": "exp(sum over examples of target-token NLL / total target tokens), teacher-forced",
            "log_base": "e",
            "tokens": "label tokens (target + eos); decoder-only prompts excluded",
        },
    }
)
PROBLEM_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "extractive_qa": {"exact_match": _SQUAD, "f1": _SQUAD},
}


def _entry(name: str, problem: str | None) -> tuple[str, str, str]:
    return PROBLEM_REGISTRY.get(problem or "", {}).get(name) or REGISTRY[name]


def load(name: str, problem: str | None = None) -> Any:
    module, cls, config = _entry(name, problem)
    mod = importlib.import_module(f"tuneval.metrics.{module}")
    return getattr(mod, cls)(config_name=config)


def settings(name: str, problem: str | None = None) -> dict[str, Any]:
    """What the metric computes and with which options: recorded on every MLflow run."""
    return {"module": f"tuneval.metrics.{_entry(name, problem)[0]}", **_settings(name, problem)}


def _settings(name: str, problem: str | None) -> dict[str, Any]:
    if name in ("bleu", "chrf"):
        return _sacrebleu_settings()
    return PROBLEM_SETTINGS.get(problem or "", {}).get(name) or SETTINGS[name]


def _sacrebleu_settings() -> dict[str, Any]:
    """sacrebleu's own signatures (version, tokeniser, smoothing): what makes BLEU comparable."""
    import sacrebleu

    def signature(metric: Any) -> str:
        metric.corpus_score(["a"], [["a"]])  # the signature needs the reference count: one, as scored
        return str(metric.get_signature())

    return {
        "library": "sacrebleu corpus_score",
        "bleu_signature": signature(sacrebleu.BLEU()),
        "chrf_signature": signature(sacrebleu.CHRF()),
        "scale": "0-100",
    }
