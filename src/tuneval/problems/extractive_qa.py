"""Extractive question answering (SQuAD style): windows, a start/end head, span post-processing.

The model is transformers' ``AutoModelForQuestionAnswering`` (a ``linear(hidden, 2)`` head over
every token; BERT-like encoders and GPT-2/Llama-family decoders alike) with the foundation's
tokenizer (a pad token added when missing). Loss is the mean of the start and end
cross-entropies, the value the HF head returns. Windows are stored unpadded; the collate pads
each batch, and left padding is undone in ``loss_fn`` so labels index the right tokens.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneval.errors import DataError, ModelError
from tuneval.models import loading
from tuneval.problems import qa_features, qa_postprocess
from tuneval.problems.base import Runtime

log = logging.getLogger(__name__)

NAME = "extractive_qa"
METRICS = ("exact_match", "f1")
TRAIN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
TENSOR_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
INFO_FILE = "tuneval_qa.json"
NEG = -1e4  # logit of positions that are padding (fits fp16 and bf16)
POSTPROCESS = ("n_best", "max_answer_length", "version_2_with_negative", "null_score_diff_threshold")


# ---------------------------------------------------------------- data


def check_data(splits: dict[str, Any], bench: Any, sources: dict[str, str]) -> dict[str, Any]:
    """Columns, answer shapes, unique ids; rows left out per split; post-processing settings."""
    skipped = qa_features.scan(splits, bench, sources)
    return {"skipped": skipped, "postprocess": {k: getattr(bench, k) for k in POSTPROCESS}}


def prepare_split(ds: Any, tokenizer: Any, bench: Any, info: dict[str, Any], split: str = "train") -> Any:
    """Windows with labels; for validation/test also offsets, contexts, questions and gold texts."""
    from datasets import Dataset

    cols, v2 = bench.columns, bench.version_2_with_negative
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"{tokenizer.name_or_path}: extractive_qa needs a fast tokenizer (character offsets); "
            "use a model that ships tokenizer.json"
        )
    budget = qa_features.question_budget(tokenizer, bench)
    rows = {"id": [], "question": [], "context": [], "answers": []}
    for i, q, c, a in zip(ds[cols.id], ds[cols.question], ds[cols.context], ds[cols.answers], strict=True):
        ans = qa_features.answer_lists(a, f"split '{split}' id {i}", cols.answers)
        if qa_features.row_problem(q, c, ans, split, v2) is None:
            rows["id"].append(str(i))
            rows["question"].append(q)
            rows["context"].append(c)
            rows["answers"].append(ans)
    if not rows["id"]:
        raise DataError(f"split '{split}': no usable question left (see the skip counts logged above); fix the data")
    questions, clipped = qa_features.clip_questions(rows["question"], tokenizer, budget)
    if clipped:
        log.warning("split '%s': %d questions longer than %d tokens were cut to fit a window", split, clipped, budget)
    keep = split != "train"
    out: dict[str, list[Any]] = {}
    step = 1000  # tokenizer batches: bounded memory, same result
    for s in range(0, len(questions), step):
        part = qa_features.windows(
            questions[s : s + step],
            rows["context"][s : s + step],
            rows["answers"][s : s + step],
            tokenizer,
            bench.max_length,
            bench.doc_stride,
            keep,
        )
        part["example_index"] = [s + e for e in part["example_index"]]
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    index = out.pop("example_index")
    out["example_id"] = [rows["id"][e] for e in index]
    if keep:
        out["question"] = [rows["question"][e] for e in index]
        out["context"] = [rows["context"][e] for e in index]
        out["answers"] = [rows["answers"][e][0] for e in index]
    else:
        out.pop("cls_index")
    return Dataset.from_dict(out)


# ---------------------------------------------------------------- model


class QAModel(nn.Module):
    """A transformers *ForQuestionAnswering model returning logits [batch, seq, 2] (start, end)."""

    tuneval_fresh = ("qa_outputs",)  # the span head is new: trained whole under LoRA (models.adapters)

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        params = inspect.signature(hf.forward).parameters
        self.takes_token_types = "token_type_ids" in params
        self.takes_positions = "position_ids" in params

    @property
    def backbone(self) -> nn.Module:
        # training.apply_trainable freezes this for `trainable: head | top_k` (qa_outputs stays trainable).
        return self.hf.base_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        if not self.takes_token_types:
            kw.pop("token_type_ids", None)
        if self.takes_positions:
            # Positions count real tokens, so a left-padded row reads as the same text right-padded.
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return torch.stack([out.start_logits, out.end_logits], dim=-1)


def _load_hf(source: loading.Source | str) -> nn.Module:
    from transformers import AutoModelForQuestionAnswering

    src = loading.plain(source)  # a GGUF: its de-quantised folder
    try:
        return AutoModelForQuestionAnswering.from_pretrained(
            src.path, revision=src.revision, trust_remote_code=src.trust_remote_code, dtype="float32"
        )
    except Exception as e:  # noqa: BLE001 - unknown architecture or missing weights alike
        raise ModelError(
            f"{source}: cannot load as a question-answering model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); use a model whose family has a QA head in transformers"
        ) from None


def build_model(run: Any, tokenizer: Any, info: dict[str, Any]) -> QAModel:
    hf = _load_hf(loading.source_of(run))
    if len(tokenizer) > hf.get_input_embeddings().num_embeddings:
        hf.resize_token_embeddings(len(tokenizer))
    hf.config.pad_token_id = tokenizer.pad_token_id
    return QAModel(hf)


def save_model(model: QAModel, tokenizer: Any, folder: Path, info: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / INFO_FILE).write_text(json.dumps({"problem": NAME, "info": info}, indent=1))


def load_model(folder: Path) -> tuple[QAModel, Any, dict[str, Any]]:
    model = QAModel(_load_hf(str(folder)))
    tokenizer = loading.load_tokenizer(str(folder))
    return model, tokenizer, json.loads((folder / INFO_FILE).read_text())["info"]


# ---------------------------------------------------------------- loss, inference, scoring


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in TENSOR_COLUMNS}


def left_pad_shift(attention_mask: torch.Tensor) -> torch.Tensor:
    """Pad tokens in front of each row (0 under right padding): labels index unpadded tokens."""
    width = attention_mask.size(1)
    left = attention_mask[:, 0] == 0
    return torch.where(left, width - attention_mask.sum(dim=1), torch.zeros_like(left, dtype=torch.long))


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the start and end cross-entropies (what transformers' QA heads return)."""
    logits = _mask_padding(model(**_inputs(batch)).float(), batch["attention_mask"])
    shift = left_pad_shift(batch["attention_mask"])
    start = F.cross_entropy(logits[..., 0], batch["start_positions"] + shift)
    end = F.cross_entropy(logits[..., 1], batch["end_positions"] + shift)
    return (start + end) / 2


def _mask_padding(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Pad positions can never be an answer: keep them out of the softmax."""
    return logits.masked_fill(attention_mask.unsqueeze(-1) == 0, NEG)


def _logits(model: nn.Module, tokenizer: Any, ds: Any, rt: Runtime) -> torch.Tensor:
    """[windows, width, 2] over the widest window; positions past a window's end hold ``NEG``."""
    from tuneval.inference.batched import predict_outputs

    width = max(len(x) for x in ds["input_ids"])

    def forward(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = _mask_padding(m(**_inputs(batch)), batch["attention_mask"])
        return F.pad(out, (0, 0, 0, width - out.size(1)), value=NEG)

    tensors = ds.select_columns([c for c in TENSOR_COLUMNS if c in ds.column_names])
    # Always right padding here: token t of a window is position t of its row.
    return predict_outputs(
        model, tensors, forward, tokenizer.pad_token_id, "right", rt.device, rt.batch_size, rt.precision, rt.progress
    )


def _answers(logits: torch.Tensor, ds: Any, info: dict[str, Any]) -> tuple[list[qa_postprocess.Answer], dict]:
    ids = ds["example_id"]
    contexts, golds, questions = {}, {}, {}
    for i, ex in enumerate(ids):
        if ex not in contexts:
            contexts[ex], golds[ex], questions[ex] = ds[i]["context"], ds[i]["answers"], ds[i]["question"]
    p = info["postprocess"]
    answers = qa_postprocess.postprocess(
        logits[..., 0].numpy(),
        logits[..., 1].numpy(),
        ids,
        ds["offset_mapping"],
        contexts,
        p["n_best"],
        p["max_answer_length"],
        p["version_2_with_negative"],
        p["null_score_diff_threshold"],
        ds["cls_index"],
    )
    return answers, {"gold_answers": [golds[a.id] for a in answers], "question": [questions[a.id] for a in answers]}


def evaluate(model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime) -> dict[str, float]:
    """Validation loss over windows, and EM/F1 over examples."""
    logits = _logits(model, tokenizer, ds, rt)
    starts, ends = torch.tensor(ds["start_positions"]), torch.tensor(ds["end_positions"])
    loss = (F.cross_entropy(logits[..., 0], starts) + F.cross_entropy(logits[..., 1], ends)) / 2
    answers, extra = _answers(logits, ds, info)
    table = {**qa_postprocess.as_columns(answers), **extra}
    results, _ = score(table, list(METRICS), info)
    return {"loss": float(loss), **results}


def predict(model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime) -> dict[str, list[Any]]:
    """Per example: id, question, predicted text, score, probability, gold answers (and v2 fields)."""
    answers, extra = _answers(_logits(model, tokenizer, ds, rt), ds, info)
    return {**qa_postprocess.as_columns(answers), **extra}


def score(
    table: dict[str, list[Any]], names: list[str], info: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    """EM/F1 from the stored predictions (no model), and a small report."""
    from tuneval import metrics

    v2 = bool(info["postprocess"]["version_2_with_negative"])
    preds, refs = table["prediction_text"], [list(g) for g in table["gold_answers"]]
    results: dict[str, float] = {}
    for name in names:
        results.update(metrics.load(name, NAME).compute(predictions=preds, references=refs, v2=v2))
    report: dict[str, Any] = {
        "examples": len(preds),
        "skipped_rows": info.get("skipped", {}),
        "empty_predictions": sum(1 for p in preds if not p),
        "mean_score": float(np.mean([s for s in table["score"] if np.isfinite(s)] or [0.0])),
        "postprocess": info["postprocess"],
    }
    if v2:
        report["predicted_no_answer"] = sum(bool(x) for x in table["no_answer"])
        report["gold_no_answer"] = sum(1 for g in refs if not g)
    return results, report
