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
# A problem kind whose metric shares a name with another kind's ("f1") overrides it here.
PROBLEM_REGISTRY: dict[str, dict[str, tuple[str, str, str]]] = {
    "extractive_qa": {
        "exact_match": ("squad", "Squad", "exact_match"),
        "f1": ("squad", "Squad", "f1"),
    },
}


def _entry(name: str, problem: str | None) -> tuple[str, str, str]:
    return PROBLEM_REGISTRY.get(problem or "", {}).get(name) or REGISTRY[name]


def load(name: str, problem: str | None = None) -> Any:
    module, cls, config = _entry(name, problem)
    mod = importlib.import_module(f"tuneval.metrics.{module}")
    return getattr(mod, cls)(config_name=config)


def settings(name: str, problem: str | None = None) -> dict[str, Any]:
    """What the metric computes and with which options: recorded on every MLflow run."""
    module_name = _entry(name, problem)[0]
    module = importlib.import_module(f"tuneval.metrics.{module_name}")
    return {"module": f"tuneval.metrics.{module_name}", **module.SETTINGS}
