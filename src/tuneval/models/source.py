"""Where a pre-trained model comes from: one value every loader and fingerprint takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Source:
    """A local folder or hub id (``path``), and for a GGUF checkpoint the file inside it."""

    path: str
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None  # a file name inside the folder / hub repo

    @classmethod
    def of(cls, path: str, model: Any) -> Source:
        """The source of ``models.<name>`` (a ModelSpec, or a stand-in with its fields) resolved to ``path``."""
        return cls(path, model.revision, model.trust_remote_code, getattr(model, "gguf_file", None))

    def __str__(self) -> str:
        return f"{self.path} (gguf_file {self.gguf_file})" if self.gguf_file else self.path


def as_source(source: Source | str, revision: str | None = None, trust_remote_code: bool = False) -> Source:
    """A ``Source`` as is; a plain path or hub id (e.g. a fine-tuned artifact folder) wrapped."""
    return source if isinstance(source, Source) else Source(str(source), revision, trust_remote_code)
