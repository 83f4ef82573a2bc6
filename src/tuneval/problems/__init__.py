"""Problem kinds. Each module holds its data checks, formatting, head, loss and post-processing.

A dict, not decorator machinery: three kinds do not need a plugin system. Modules are imported
on first use: they import torch, which a fully cached run never needs (2.5 s of its start-up).
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {
    "classification": "tuneval.problems.classification",
    "extractive_qa": "tuneval.problems.extractive_qa",
    "seq2seq": "tuneval.problems.seq2seq",
}
# Problems whose module defines ``intrinsic`` (perplexity of the pre-trained model); kept here so
# planning a run does not import the module. tests/test_heads.py checks it against the modules.
WITH_INTRINSIC = frozenset({"seq2seq"})


def get(problem: str) -> ModuleType:
    return importlib.import_module(MODULES[problem])


def has_intrinsic(problem: str) -> bool:
    return problem in WITH_INTRINSIC
