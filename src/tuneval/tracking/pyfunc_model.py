"""A fine-tuned model as an MLflow pyfunc: ``mlflow.pyfunc.load_model(uri).predict(df)``.

The logged model's artifacts are the finetune artifact's ``model/`` folder, as the problem saved
it, and ``tuneval_model.json`` (``logged_model.model_meta``: problem, benchmark formatting,
generation settings, levers, base model). Loading and predicting go through the problem's own
hooks (``load_model``, ``prepare_split``, ``predict``), the ones the predict stage calls, so the
pyfunc's answers are tuneval's predictions, and any folder a problem can load (one holding only an
adapter and a head, say) loads here the same way.

``df`` holds the benchmark's input columns under the names ``columns:`` gives them (classification:
text [, text_pair]; extractive QA: question, context; seq2seq: source, a dotted name either as a
flat column or nested). Gold columns are not needed: placeholders stand in for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

META_FILE = "tuneval_model.json"
# The predict table's column each problem answers with, and the column naming its rows.
OUTPUT = {
    "classification": ("example_id", "prediction_name"),
    "extractive_qa": ("id", "prediction_text"),
    "seq2seq": ("example_id", "prediction"),
}


def input_columns(problem: str, bench: dict[str, Any]) -> list[str]:
    """The columns ``predict`` reads from its DataFrame (optional ones excluded)."""
    cols = bench.get("columns", {})
    if problem == "classification":
        return [cols.get("text", "text")]
    if problem == "extractive_qa":
        return [cols.get("question", "question"), cols.get("context", "context")]
    return [cols.get("source", "source")]


class TunevalModel(mlflow.pyfunc.PythonModel):
    """Loads the model folder with its problem's ``load_model``; predicts through ``prepare_split``
    and ``predict`` on the rows given, returning one answer per row, in order."""

    def load_context(self, context: Any) -> None:
        from pydantic import TypeAdapter

        from tuneval import accel, problems
        from tuneval.config.benchmarks import BenchmarkSpec
        from tuneval.problems.base import Runtime
        from tuneval.training.device import resolve_device, resolve_precision

        meta = json.loads(Path(context.artifacts["tuneval"]).read_text())
        self.meta = meta
        self.problem = problems.get(meta["problem"])
        self.bench = TypeAdapter(BenchmarkSpec).validate_python(meta["benchmark"])
        from tuneval.models import finetuned

        model, self.tokenizer, self.info = finetuned.load(self.problem, Path(context.artifacts["model"]))
        device = resolve_device(meta.get("device", "auto"))
        levers = meta.get("levers", {}).get(device.type)
        self.model = accel.apply(model, accel.Levers(**levers) if levers else accel.MAINSTREAM)
        self.runtime = Runtime(device, resolve_precision(meta["precision"], device), meta["eval_batch_size"])

    # MLflow reads predict's type hints: a DataFrame is one it accepts without inferring a schema
    # (the signature logged with the model gives it: the benchmark's input columns).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[Any]:
        from datasets import Dataset

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if df.empty:
            return []
        rows = placeholder_rows(self.meta["problem"], self.bench, self.info, df)
        ds = self.problem.prepare_split(Dataset.from_dict(rows), self.tokenizer, self.bench, self.info, "test")
        info = {**self.info, **self.meta.get("predict_options", {})}
        table = self.problem.predict(self.model, self.tokenizer, ds, info, self.runtime)
        id_col, out_col = OUTPUT[self.meta["problem"]]
        answers = dict(zip(table[id_col], table[out_col], strict=True))
        # A row the problem leaves out (a QA row with an empty question) has no answer: None.
        return [answers.get(str(i)) for i in range(len(df))]


def placeholder_rows(problem: str, bench: Any, info: dict[str, Any], df: Any) -> dict[str, list[Any]]:
    """The DataFrame as the rows ``prepare_split`` expects: its input columns, row positions as
    ids (answers come back in order), and placeholders where gold values would be."""
    n, cols = len(df), bench.columns
    ids = [str(i) for i in range(n)]
    if problem == "classification":
        rows = {cols.text: _column(df, cols.text), cols.label: [info["label_names"][0]] * n}
        if cols.text_pair:
            rows[cols.text_pair] = _column(df, cols.text_pair)
        if cols.id:
            rows[cols.id] = ids
        return rows
    if problem == "extractive_qa":
        return {
            cols.id: ids,
            cols.question: _column(df, cols.question),
            cols.context: _column(df, cols.context),
            # Any well-formed answer: prepare keeps test rows whatever the gold is.
            cols.answers: [{"text": [""], "answer_start": [0]}] * n,
        }
    flat = {cols.source: _column(df, cols.source), cols.target: [""] * n}
    if cols.id:
        flat[cols.id] = ids
    return nest(flat)


def _column(df: Any, name: str) -> list[Any]:
    """A column by name; a dotted name may also be a path into a column of dicts."""
    if name in df.columns:
        return [None if v is None else str(v) for v in df[name].tolist()]
    top, _, rest = name.partition(".")
    if rest and top in df.columns:
        out = []
        for value in df[top].tolist():
            for part in rest.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            out.append(value)
        return out
    raise ValueError(f"input has no column '{name}' (columns: {', '.join(map(str, df.columns))}); add it")


def nest(flat: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Dotted column names (``translation.en``) as nested dicts, the layout seq2seq reads."""
    out: dict[str, list[Any]] = {}
    for name, values in flat.items():
        top, _, rest = name.partition(".")
        if not rest:
            out[name] = values
            continue
        column = out.setdefault(top, [{} for _ in values])
        for row, value in zip(column, values, strict=True):
            *path, leaf = rest.split(".")
            for part in path:
                row = row.setdefault(part, {})
            row[leaf] = value
    return out
