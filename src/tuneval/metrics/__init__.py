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


def load(name: str) -> Any:
    module, cls, config = REGISTRY[name]
    mod = importlib.import_module(f"tuneval.metrics.{module}")
    return getattr(mod, cls)(config_name=config)


def settings(name: str) -> dict[str, Any]:
    """What the metric computes and with which options: recorded on every MLflow run."""
    module = importlib.import_module(f"tuneval.metrics.{REGISTRY[name][0]}")
    return {"module": f"tuneval.metrics.{REGISTRY[name][0]}", **module.SETTINGS}
