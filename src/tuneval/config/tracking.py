"""``tracking:`` in pipelines.yaml: what tuneval writes to MLflow beyond params, metrics and files.

Top level, not per pipeline: it is about the store, not the recipe, and it never enters a cache
key (logging a model or not changes nothing that is computed).
"""

from __future__ import annotations

from pydantic import Field, StrictBool

from tuneval.config.base import Strict


class TrackingSpec(Strict):
    # StrictBool: "no" written as a string or 0 would otherwise pass as a bool.
    log_models: StrictBool = Field(
        True,
        description="log each fine-tuned model as an MLflow LoggedModel with a pyfunc flavour (once per "
        "finetune cache key); false skips it, e.g. in large sweeps",
    )
