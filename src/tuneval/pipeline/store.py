"""Content-addressed stage artifacts, written atomically, verified on every use.

Layout: ``<cache>/<stage>/<key>/`` holding the stage's files plus ``manifest.json`` (written
last: sha256 of every file, the key's parts, the stage's metadata). A folder is built under a
temporary name and renamed into place, under a file lock per key, so a crash or a second
process never leaves a half-written artifact where a reader could find it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ArtifactRef:
    """What stages pass to each other: a path and a content fingerprint, never objects."""

    stage: str
    key: str
    path: str
    fingerprint: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def meta(self) -> dict[str, Any]:
        return read_manifest(self.dir)["meta"]


@dataclass(frozen=True)
class StageOutcome:
    ref: ArtifactRef
    status: str  # "ran" | "cached"
    seconds: float
    key_parts: dict[str, Any] = field(default_factory=dict)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, code_version: int, spec: Any, upstream: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Key = sha256 over the stage name, its code version, its spec slice and upstream fingerprints."""
    parts = {"stage": stage, "code_version": code_version, "spec": spec, "upstream": upstream}
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:24], parts


# Digests already computed by this process, keyed by the file's identity and stat: a run
# verifies the same model and data files several times (planning, then each stage's key and
# lookup), and a 90 MB model costs ~0.3 s per hash. Any write changes size or mtime_ns.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    st = os.stat(path)
    ident = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if (known := _DIGESTS.get(ident)) is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _DIGESTS[ident] = digest = h.hexdigest()
    return digest


class NotCached(Exception):
    """Raised instead of building, inside ``lookup_only()``: the stage would have to run."""

    def __init__(self, stage: str):
        super().__init__(f"{stage} is not cached")
        self.stage = stage


_LOOKUP_ONLY: ContextVar[bool] = ContextVar("tuneval_lookup_only", default=False)


@contextmanager
def lookup_only() -> Iterator[None]:
    """Within this block ``Store.get_or_build`` never builds: a miss raises ``NotCached``.
    Used to plan an invocation (is everything cached?) with the stages' own key code."""
    token = _LOOKUP_ONLY.set(True)
    try:
        yield
    finally:
        _LOOKUP_ONLY.reset(token)


def hash_files(paths: list[Path], root: Path | None = None) -> str:
    """One digest over the names (relative to ``root``) and contents of ``paths``."""
    h = hashlib.sha256()
    for p in sorted(paths):
        name = str(p.relative_to(root)) if root else p.name
        h.update(name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _file_list(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def verify(folder: Path) -> str | None:
    """Return the fingerprint if every file matches its recorded checksum, else None."""
    try:
        manifest = read_manifest(folder)
        files = manifest["files"]
        actual = {str(p.relative_to(folder)): p for p in _file_list(folder)}
        if set(actual) != set(files):
            return None
        for name, digest in files.items():
            if actual[name].stat().st_size != digest["size"] or sha256_file(actual[name]) != digest["sha256"]:
                return None
        return manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Store:
    """The artifact cache under one root folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        """Scratch space that survives a crash (checkpoints), beside the artifact, never inside it."""
        return self.root / stage / f"{key}.work"

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        folder = self.folder(stage, key)
        if not folder.exists():
            return None
        fingerprint = verify(folder)
        if fingerprint is None:
            log.warning("cached %s artifact %s is incomplete or corrupted; rebuilding it", stage, folder)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return ArtifactRef(stage=stage, key=key, path=str(folder), fingerprint=fingerprint)

    def get_or_build(
        self,
        stage: str,
        key: str,
        key_parts: dict[str, Any],
        build: Callable[[Path], dict[str, Any]],
        force: bool = False,
    ) -> StageOutcome:
        """Return the cached artifact for ``key`` or build it with ``build(tmp_dir) -> meta``."""
        start = time.perf_counter()
        if _LOOKUP_ONLY.get():
            # No lock: committed folders appear by an atomic rename, and a probe must not wait
            # behind another process's hour-long build.
            ref = None if force else self.lookup(stage, key)
            if ref is None:
                raise NotCached(stage)
            return StageOutcome(ref, "cached", time.perf_counter() - start, key_parts)
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        # One process builds a key while another waits, then reuses its result.
        with FileLock(str(self.root / stage / f"{key}.lock")):
            if not force:
                ref = self.lookup(stage, key)
                if ref is not None:
                    return StageOutcome(ref, "cached", time.perf_counter() - start, key_parts)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root / stage))
            try:
                meta = build(tmp)
                ref = self._commit(stage, key, key_parts, tmp, meta)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return StageOutcome(ref, "ran", time.perf_counter() - start, key_parts)

    def _commit(self, stage: str, key: str, key_parts: dict[str, Any], tmp: Path, meta: dict[str, Any]) -> ArtifactRef:
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in _file_list(tmp)}
        fingerprint = hashlib.sha256(canonical_json(files).encode()).hexdigest()[:24]
        manifest = {
            "stage": stage,
            "key": key,
            "key_parts": key_parts,
            "fingerprint": fingerprint,
            "files": files,
            "meta": meta,
            "created": time.time(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        final = self.folder(stage, key)
        if final.exists():  # forced rebuild: move the old one aside, then swap
            trash = final.with_name(f".{key}.old.{os.getpid()}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        return ArtifactRef(stage=stage, key=key, path=str(final), fingerprint=fingerprint)
