"""Summarization and translation (seq2seq): data checks, formatting, models, generation, scores.

The architecture of the model (encoder-decoder, encoder-only warm-started as BERT2BERT, or
decoder-only) decides how examples are laid out (see ``seq2seq_format``) and how the model is
built (``seq2seq_models``). Prediction is generation (``tuneval.decoding``); perplexity is the
exponential of the mean teacher-forced NLL per target token (for decoder-only models, over the
target and its eos, never the prompt).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch.nn as nn

from tuneval.errors import DataError
from tuneval.models import loading
from tuneval.problems import seq2seq_format as fmt
from tuneval.problems import seq2seq_models as sm
from tuneval.problems.base import Runtime

log = logging.getLogger(__name__)

NAME = "seq2seq"
METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "perplexity")
TRAIN_COLUMNS = ("input_ids", "attention_mask", "labels")
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ---------------------------------------------------------------- data checks and formatting


def check_data(splits: dict[str, Any], bench: Any, sources: dict[str, str]) -> dict[str, Any]:
    """Every split has non-empty string sources and targets; return the settings later hooks need."""
    cols = bench.columns
    for split, ds in splits.items():
        first = ds[0] if len(ds) else None
        for field, name in (("source", cols.source), ("target", cols.target), ("id", cols.id)):
            if name and not fmt.has_column(ds.column_names, first, name):
                raise DataError(
                    f"{sources[split]}: column '{name}' missing from split '{split}' "
                    f"(columns: {', '.join(ds.column_names)}); fix benchmarks.<name>.columns.{field} "
                    "(a dotted name such as translation.en reads a nested field)"
                )
        for field, name in (("source", cols.source), ("target", cols.target)):
            bad = [i for i, v in enumerate(_values(ds, name)) if not isinstance(v, str) or not v.strip()]
            if bad:
                raise DataError(
                    f"{sources[split]}: row {bad[0] + 1}: '{name}' is empty or not text in split '{split}' "
                    f"({len(bad)} such rows); remove those rows or fix benchmarks.<name>.columns.{field}"
                )
    # Generation settings are not here: the predict stage hands them over (keys.predict_options),
    # so changing them reruns predict and score only.
    return {"prefix": bench.prefix}


def _values(ds: Any, name: str) -> list[Any]:
    top = name.split(".")[0]
    if top == name:
        return list(ds[name])
    out = []
    for v in ds[top]:
        try:
            out.append(fmt.column_value({top: v}, name))
        except KeyError:
            out.append(None)
    return out


def prepare_split(ds: Any, tokenizer: Any, bench: Any, info: dict[str, Any], split: str = "train") -> Any:
    """input_ids, attention_mask, labels (lists; collate pads labels with -100), example_id, and
    for evaluation splits the source and reference texts (plus prompt_length for decoder-only)."""
    source_path = tokenizer.name_or_path
    arch = sm.architecture_of(source_path)
    sm.ensure_special_tokens(tokenizer, arch, source_path)
    start = sm.decoder_start_id(loading.load_config(source_path), tokenizer, arch)
    sep_ids = tokenizer(fmt.CAUSAL_SEPARATOR, add_special_tokens=False)["input_ids"]
    cols, keep_text = bench.columns, split != "train"

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        sources = _batch_values(batch, cols.source)
        targets = _batch_values(batch, cols.target)
        texts = [fmt.source_text(bench.prefix, s) for s in sources]
        enc = tokenizer(texts, truncation=True, max_length=bench.max_source_length)
        if arch == sm.DECODER_ONLY:
            tgt = tokenizer(targets, add_special_tokens=False)["input_ids"]
            rows = [
                fmt.causal_example(p + sep_ids, t, tokenizer.eos_token_id, bench.max_target_length)
                for p, t in zip(enc["input_ids"], tgt, strict=True)
            ]
            out = {k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels", "prompt_length")}
        else:
            tgt = tokenizer(targets, truncation=True, max_length=bench.max_target_length)["input_ids"]
            out = {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": [fmt.encdec_labels(t, start) for t in tgt],
            }
        ids = _batch_values(batch, cols.id) if cols.id else indices
        out["example_id"] = [str(v) for v in ids]
        if keep_text:
            out["source"], out["reference"] = sources, targets
        return out

    # keep_in_memory: map's cache files would otherwise land inside the (immutable) load artifact.
    return ds.map(
        encode, batched=True, with_indices=True, remove_columns=ds.column_names, keep_in_memory=True, desc="tokenize"
    )


def _batch_values(batch: dict[str, list[Any]], name: str) -> list[Any]:
    top = name.split(".")[0]
    return [fmt.column_value({top: v}, name) for v in batch[top]]


# ---------------------------------------------------------------- model


def build_model(run: Any, tokenizer: Any, info: dict[str, Any]) -> nn.Module:
    model, arch = sm.build(loading.source_of(run), tokenizer)
    model_type = getattr(model.config, "model_type", "")
    if arch == sm.ENCODER_ONLY:
        model_type = model.config.encoder.model_type
    if info.get("prefix") and not sm.uses_prefix(model_type):
        log.warning(
            "benchmarks.%s.prefix %r: %s models were not pre-trained with task prefixes; it is kept as "
            "plain text (drop the prefix unless you mean it)",
            run.benchmark_name,
            info["prefix"],
            model_type,
        )
    if run.train.trainable != "all":
        log.warning("train.trainable=%s: seq2seq fine-tunes every parameter; setting ignored", run.train.trainable)
    # Training pads on the right (labels are masked, positions stay 0..n); generation pads its
    # prompts on the left itself. Stages read padding_side after build_model.
    tokenizer.padding_side = "right"
    model.tuneval_architecture = arch
    # BERT2BERT's cross-attention is newly initialised: trained whole under LoRA (models.adapters).
    model.tuneval_fresh = ("crossattention",) if arch == sm.ENCODER_ONLY else ()
    return model


def save_model(model: nn.Module, tokenizer: Any, folder: Path, info: dict[str, Any]) -> None:
    sm.save(model, tokenizer, folder, getattr(model, "tuneval_architecture", _arch(model)), info)


def load_model(folder: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    model, tokenizer, arch, info = sm.load(folder)
    model.tuneval_architecture = arch
    return model, tokenizer, info


def _arch(model: nn.Module) -> str:
    return sm.ENCODER_DECODER if model.config.is_encoder_decoder else sm.DECODER_ONLY


# ---------------------------------------------------------------- loss, evaluation, prediction


def loss_fn(model: nn.Module, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over label tokens; the model shifts labels itself (-100 ignored)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def _nll(model: nn.Module, tokenizer: Any, ds: Any, rt: Runtime) -> dict[str, list[float]]:
    return sm.token_nll(model, ds, tokenizer.pad_token_id, rt.device, rt.batch_size, rt.precision)


def perplexity_of(nll: list[float], tokens: list[float]) -> float:
    total = sum(tokens)
    return math.exp(sum(nll) / total) if total else float("nan")


def evaluate(model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime) -> dict[str, float]:
    """Validation without generation (cheap every epoch): token loss, perplexity and
    teacher-forced next-token accuracy (higher is better: usable as train.best_metric)."""
    r = _nll(model, tokenizer, ds, rt)
    tokens = sum(r["tokens"]) or 1.0
    return {
        "loss": sum(r["nll"]) / tokens,
        "perplexity": perplexity_of(r["nll"], r["tokens"]),
        "token_accuracy": sum(r["correct"]) / tokens,
    }


def predict(model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime) -> dict[str, list[Any]]:
    """Generated text beside its reference and source, with the teacher-forced NLL of the reference.
    ``info["generation"]`` comes from the predict stage (the benchmark's generation block)."""
    from tuneval.inference import decoding

    texts = decoding.generate_texts(model, tokenizer, ds, info["generation"], rt.device, rt.precision, rt.progress)
    r = _nll(model, tokenizer, ds, rt)
    return {
        "example_id": ds["example_id"],
        "source": ds["source"],
        "reference": ds["reference"],
        "prediction": texts,
        "nll": r["nll"],
        "target_tokens": [int(t) for t in r["tokens"]],
    }


def intrinsic(model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime) -> dict[str, float]:
    """Perplexity of the model before fine-tuning on the test targets (same tokens as predict's)."""
    r = _nll(model, tokenizer, ds, rt)
    return {"pretrained_perplexity": perplexity_of(r["nll"], r["tokens"])}


def score(
    table: dict[str, list[Any]], names: list[str], info: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics from the stored predictions (no model), plus a short report with a few examples."""
    from tuneval import metrics

    preds, refs = table["prediction"], table["reference"]
    results: dict[str, float] = {}
    report: dict[str, Any] = {}
    for name in names:
        if name == "perplexity":
            m = metrics.load(name)
            results.update(m.compute(nll_sums=table["nll"], token_counts=table["target_tokens"]))
            continue
        m = metrics.load(name)
        results.update(m.compute(predictions=preds, references=refs))
        if name in ("bleu", "chrf"):
            report[f"{name}_signature"] = metrics.settings(name)[f"{name}_signature"]
    report.update(
        {
            "examples": len(preds),
            "empty_predictions": sum(1 for p in preds if not p.strip()),
            "mean_prediction_words": sum(len(p.split()) for p in preds) / max(len(preds), 1),
            "mean_reference_words": sum(len(r.split()) for r in refs) / max(len(refs), 1),
            "samples": [
                {"example_id": table["example_id"][i], "reference": refs[i], "prediction": preds[i]}
                for i in range(min(5, len(preds)))
            ],
        }
    )
    return results, report
