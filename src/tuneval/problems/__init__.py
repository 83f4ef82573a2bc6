"""Problem kinds. Each module holds its data checks, formatting, head, loss and post-processing.

A dict, not decorator machinery: three kinds do not need a plugin system.
"""

from __future__ import annotations

from types import ModuleType

from tuneval.problems import classification, extractive_qa, seq2seq

PROBLEMS: dict[str, ModuleType] = {
    classification.NAME: classification,
    extractive_qa.NAME: extractive_qa,
    seq2seq.NAME: seq2seq,
}


def get(problem: str) -> ModuleType:
    return PROBLEMS[problem]
