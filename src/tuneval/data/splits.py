"""The load stage's core: materialise a benchmark's splits as Arrow, from files or the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneval.config.benchmarks import DataSpec
from tuneval.config.paths import data_format
from tuneval.errors import DataError
from tuneval.pipeline.store import sha256_file

SPLITS = ("train", "validation", "test")


def source_identity(data: DataSpec) -> dict[str, Any]:
    """What the load stage's cache key sees: file contents (not paths), or the hub coordinates."""
    if data.files:
        return {
            split: {"sha256": sha256_file(Path(f)), "format": data_format(data.format, Path(f))}
            for split, f in sorted(data.files.items())
        }
    return data.model_dump(exclude={"files", "format"})


def materialise(data: DataSpec, out: Path) -> dict[str, Any]:
    """Write each split to ``out/<split>`` with ``save_to_disk``; return row counts and sources."""
    splits: dict[str, Any] = {}
    for split, ds, source in _iter_splits(data):
        if len(ds) == 0:
            raise DataError(f"{source}: split '{split}' has no rows; add data or drop the split")
        ds.save_to_disk(str(out / split))
        splits[split] = {"rows": len(ds), "columns": ds.column_names, "source": source}
    return {"splits": splits}


def open_split(folder: str | Path, split: str) -> Any:
    from datasets import load_from_disk

    return load_from_disk(str(Path(folder) / split))


def _iter_splits(data: DataSpec) -> Any:
    from datasets import load_dataset

    if data.files:
        for split, file in data.files.items():
            path = Path(file)
            fmt = data_format(data.format, path)
            if path.suffix.lower() in (".jsonl", ".ndjson"):
                check_json_lines(path)
            try:
                ds = load_dataset(fmt, data_files=str(path), split="train")
            except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault here
                raise DataError(f"{path}: cannot be read as {fmt}: {_root_cause(e)}; fix or replace the file") from None
            yield split, ds, str(path)
        return
    mapping = data.splits or {"train": "train", "validation": "validation", "test": "test"}
    for split, hub_split in mapping.items():
        where = f"{data.hub}{'/' + data.subset if data.subset else ''}[{hub_split}]"
        try:
            ds = load_dataset(data.hub, data.subset, split=hub_split, revision=data.revision)
        except ValueError as e:
            if data.splits is None and split == "validation" and "split" in str(e).lower():
                continue  # a hub dataset without a validation split is fine unless asked for
            raise DataError(f"{where}: {_root_cause(e)}; check data.hub, data.subset and data.splits") from None
        except Exception as e:  # noqa: BLE001 - network, auth and missing-dataset errors alike
            raise DataError(f"{where}: cannot load from the hub: {_root_cause(e)}") from None
        yield split, ds, where


def check_json_lines(path: Path) -> None:
    """Line-exact errors for JSON Lines, and mixed value types per field, which pyarrow's reader
    would otherwise coerce silently (a label "1" and a label 1 would become one class)."""
    import json

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    first_seen: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg}); fix that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        for key, value in row.items():
            if value is None:
                continue
            kind = "number" if type(value) in (int, float) else type(value).__name__
            seen = first_seen.setdefault(key, (kind, n))
            if seen[0] != kind:
                raise DataError(
                    f"{path}:{n}: field '{key}' is {kind} here but {seen[0]} on line {seen[1]}; "
                    "make every value of a field the same type"
                )


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
