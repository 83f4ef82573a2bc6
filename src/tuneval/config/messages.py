"""Config problems as one line each: ``file:line: yaml.path: what is wrong; fix``.

Pydantic's errors are rephrased (unknown keys name the allowed ones and the nearest match),
duplicates dropped, and each located at its line in the YAML file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tuneval.config.train import TrainSettings


def describe(err: Any) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "model_type":
        return f"expected a mapping (got {value!r})"
    if kind == "union_tag_invalid":
        return f"{msg}"
    if kind == "bool_type":
        return f"expected true or false (got {value!r}); write true or false, unquoted"
    if kind == "string_pattern_mismatch":
        return f"invalid name {value!r}: use letters, digits, '_', '-', '.' (no '/' or spaces)"
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return f"{msg} (got {shown})"


def suggest(word: str, choices: Any) -> str:
    names = [str(c) for c in (choices or [])]
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; declared: {', '.join(names) or 'none'}"


UNION_TAGS = {"TopK", "str", "int", "float", "bool", "classification", "extractive_qa", "seq2seq"}


def _is_tag(part: Any) -> bool:
    """pydantic puts the union member it tried into the location; users never see those."""
    return isinstance(part, str) and (part in UNION_TAGS or part.startswith("literal["))


def dedupe(problems: list[tuple[tuple[Any, ...], str]]) -> list[tuple[tuple[Any, ...], str]]:
    """One line per location: union members' errors at the same place are merged, and a member's
    error on the whole value is dropped when another member says what is wrong inside it."""
    merged: dict[tuple[Any, ...], list[str]] = {}
    from_union: set[tuple[Any, ...]] = set()
    for loc, msg in problems:
        clean = tuple(p for p in loc if not _is_tag(p))
        if clean != loc:
            from_union.add(clean)
        if msg not in merged.setdefault(clean, []):
            merged[clean].append(msg)
    out = []
    for loc, msgs in merged.items():
        deeper = any(other[: len(loc)] == loc and len(other) > len(loc) for other in merged if other in from_union)
        if loc in from_union and deeper:
            continue
        out.append((loc, "; or ".join(msgs)))
    return out


def format_problem(
    path: Path, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...], msg: str, raw: dict[str, Any] | None = None
) -> str:
    clean = loc
    dotted = ""
    for part in clean:
        dotted += f"[{part}]" if isinstance(part, int) else (("." if dotted else "") + str(part))
    line = _nearest_line(lines, clean)
    where = f"{path.name}:{line}" if line else path.name
    if "unknown key" in msg and clean:
        parent = _allowed_keys(clean, raw)
        if parent:
            msg += f" (allowed here: {', '.join(parent)})"
    return f"{where}: {dotted or '<top>'}: {msg}"


def _allowed_keys(loc: tuple[Any, ...], raw: dict[str, Any] | None = None) -> list[str]:
    """Field names allowed beside an unknown key, for the error message."""
    from tuneval.config import benchmarks, schema

    kinds: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
        "classification": (benchmarks.ClassificationBenchmark, benchmarks.ClassificationColumns),
        "extractive_qa": (benchmarks.ExtractiveQABenchmark, benchmarks.QAColumns),
        "seq2seq": (benchmarks.Seq2SeqBenchmark, benchmarks.Seq2SeqColumns),
    }
    if len(loc) >= 2 and loc[-2] == "train":
        return list(TrainSettings.model_fields)
    if len(loc) == 1:
        return list(schema.Config.model_fields)
    if loc[0] == "tracking" and len(loc) == 2:
        return list(schema.TrackingSpec.model_fields)
    if loc[0] == "benchmarks" and len(loc) in (3, 4):
        bench, columns = kinds.get(_problem_of(raw, loc[1]), kinds["classification"])
        if len(loc) == 3:
            return list(bench.model_fields)
        sub = {"data": benchmarks.DataSpec, "generation": benchmarks.GenerationSettings, "columns": columns}.get(loc[2])
        return list(sub.model_fields) if sub else []
    top = {"models": schema.ModelSpec, "pipelines": schema.PipelineSpec}
    if len(loc) == 3 and loc[0] in top:
        return list(top[loc[0]].model_fields)
    return []


def _problem_of(raw: dict[str, Any] | None, bench: Any) -> Any:
    entry = (raw or {}).get("benchmarks", {})
    entry = entry.get(bench) if isinstance(entry, dict) else None
    return entry.get("problem") if isinstance(entry, dict) else None


def line_index(node: yaml.Node | None) -> dict[tuple[Any, ...], int]:
    """Map each YAML path (keys and list indices) to its 1-based line number."""
    index: dict[tuple[Any, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[Any, ...]) -> None:
        index.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                index[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return index


def _nearest_line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for cut in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:cut])
        if key in lines:
            return lines[key]
    return None
