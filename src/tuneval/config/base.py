"""The schema's shared pieces: a strict, frozen base model and the name pattern."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

# Names become MLflow experiment/run names and cache path parts: no separators, no dots first.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
SplitName = Literal["train", "validation", "test"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
