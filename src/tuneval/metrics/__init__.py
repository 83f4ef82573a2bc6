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


def load(name: str) -> Any:
    module, cls, config = REGISTRY[name]
    mod = importlib.import_module(f"tuneval.metrics.{module}")
    return getattr(mod, cls)(config_name=config)


def settings(name: str) -> dict[str, Any]:
    """What the metric computes and with which options: recorded on every MLflow run."""
    return {"module": f"tuneval.metrics.{REGISTRY[name][0]}", **SETTINGS[name]}
