"""The artifact store: atomic builds, content keys, corruption detected and rebuilt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tuneval.pipeline.store import Store, stage_key


def build_counter(calls: list[int], text: str = "hello"):
    def build(out: Path) -> dict:
        calls.append(1)
        (out / "a.txt").write_text(text)
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(b"\x00\x01")
        return {"n": len(calls)}

    return build


def test_second_lookup_is_cached_and_same_fingerprint(tmp_path: Path) -> None:
    store, calls = Store(tmp_path), []
    key, parts = stage_key("s", 1, {"x": 1}, {})
    first = store.get_or_build("s", key, parts, build_counter(calls))
    second = store.get_or_build("s", key, parts, build_counter(calls))
    assert (first.status, second.status) == ("ran", "cached")
    assert first.ref == second.ref and len(calls) == 1
    assert second.ref.meta() == {"n": 1}


def test_key_depends_on_spec_upstream_and_code_version() -> None:
    base = stage_key("s", 1, {"x": 1}, {"up": "f1"})[0]
    assert stage_key("s", 1, {"x": 1}, {"up": "f1"})[0] == base
    assert stage_key("s", 1, {"x": 2}, {"up": "f1"})[0] != base
    assert stage_key("s", 1, {"x": 1}, {"up": "f2"})[0] != base
    assert stage_key("s", 2, {"x": 1}, {"up": "f1"})[0] != base
    assert stage_key("s", 1, {"x": 1, "y": None}, {"up": "f1"})[0] != base


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key, parts = stage_key("s", 1, {}, {})

    def boom(out: Path) -> dict:
        (out / "half.txt").write_text("partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.get_or_build("s", key, parts, boom)
    assert store.lookup("s", key) is None
    assert not [p for p in (tmp_path / "s").iterdir() if p.is_dir()]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra"])
def test_corrupted_artifact_is_detected_and_rebuilt(tmp_path: Path, caplog, damage: str) -> None:
    store, calls = Store(tmp_path), []
    key, parts = stage_key("s", 1, {}, {})
    ref = store.get_or_build("s", key, parts, build_counter(calls)).ref
    target = ref.dir / "a.txt"
    if damage == "truncate":
        target.write_text("hel")
    elif damage == "flip":
        target.write_text("jello")  # same size, other content
    elif damage == "delete":
        target.unlink()
    else:
        (ref.dir / "stray.txt").write_text("?")
    with caplog.at_level(logging.WARNING):
        again = store.get_or_build("s", key, parts, build_counter(calls))
    assert again.status == "ran" and len(calls) == 2
    assert (again.ref.dir / "a.txt").read_text() == "hello"
    assert any("corrupted" in r.getMessage() for r in caplog.records)


def test_force_rebuilds(tmp_path: Path) -> None:
    store, calls = Store(tmp_path), []
    key, parts = stage_key("s", 1, {}, {})
    store.get_or_build("s", key, parts, build_counter(calls))
    forced = store.get_or_build("s", key, parts, build_counter(calls), force=True)
    assert forced.status == "ran" and len(calls) == 2 and forced.ref.meta() == {"n": 2}
