"""Text (and text-pair) classification: data checks, formatting, the head, loss, post-processing.

The head is dropout + linear over one pooled token: the first ([CLS]) for encoders, the last
real (non-pad) token for causal LMs, found from the attention mask so that left and right
padding both work and a pad token equal to eos does no harm.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneval.errors import DataError
from tuneval.models import loading
from tuneval.problems.base import Runtime

NAME = "classification"
METRICS = ("accuracy", "f1", "precision", "recall")
TRAIN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")
HEAD_FILE = "head.safetensors"
HEAD_CONFIG = "tuneval_head.json"


# ---------------------------------------------------------------- data checks and formatting


def check_data(splits: dict[str, Any], bench: Any, sources: dict[str, str]) -> dict[str, Any]:
    """Check columns and labels of every split; return ``{"label_names": [...]}`` in id order."""
    cols = bench.columns
    wanted = [c for c in (cols.text, cols.text_pair, cols.label, cols.id) if c]
    for split, ds in splits.items():
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            field = {cols.text: "text", cols.text_pair: "text_pair", cols.label: "label", cols.id: "id"}[missing[0]]
            raise DataError(
                f"{sources[split]}: column '{missing[0]}' missing from split '{split}' "
                f"(columns: {', '.join(ds.column_names)}); fix benchmarks.<name>.columns.{field}"
            )
    train_labels = splits["train"][cols.label]
    kinds = {type(v).__name__ if v is not None else "null" for v in train_labels}
    if len(kinds) > 1 or "null" in kinds:
        raise DataError(
            f"{sources['train']}: column '{cols.label}' mixes label types ({', '.join(sorted(kinds))}); "
            "make every label a string or every label an integer"
        )
    seen = sorted(set(train_labels), key=lambda v: (str(type(v)), v))
    if bench.labels is not None:
        declared = list(bench.labels)
        extra = [v for v in seen if v not in declared]
        if extra:
            raise DataError(
                f"{sources['train']}: label {extra[0]!r} is not in benchmarks.<name>.labels {declared}; "
                "add it there or fix the data"
            )
        names = declared
    else:
        names = seen
    if len(names) < 2:
        raise DataError(f"{sources['train']}: only one label value ({names}); classification needs two or more")
    for split, ds in splits.items():
        if split == "train":
            continue
        unknown = Counter(v for v in ds[cols.label] if v not in names)
        if unknown:
            value, count = unknown.most_common(1)[0]
            raise DataError(
                f"{sources[split]}: label {value!r} ({count} rows) never occurs in train "
                f"(train labels: {names}); fix the data or declare benchmarks.<name>.labels"
            )
    return {"label_names": names}


def prepare_split(ds: Any, tokenizer: Any, bench: Any, info: dict[str, Any], split: str = "train") -> Any:
    """Token ids without padding (collate pads each batch), labels as ids, a stable example id."""
    cols = bench.columns
    label2id = {v: i for i, v in enumerate(info["label_names"])}

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        pair = batch[cols.text_pair] if cols.text_pair else None
        enc = tokenizer(batch[cols.text], pair, truncation=True, max_length=bench.max_length)
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = [label2id[v] for v in batch[cols.label]]
        out["example_id"] = [str(v) for v in batch[cols.id]] if cols.id else [str(i) for i in indices]
        return out

    # keep_in_memory: map's cache files would otherwise land inside the (immutable) load artifact.
    return ds.map(
        encode, batched=True, with_indices=True, remove_columns=ds.column_names, keep_in_memory=True, desc="tokenize"
    )


# ---------------------------------------------------------------- model


class Classifier(nn.Module):
    """A pre-trained backbone with a fresh dropout + linear head over one pooled token."""

    tuneval_fresh = ("classifier",)  # not pre-trained: trained whole under LoRA (models.adapters)

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(loading.hidden_size(backbone.config), num_labels)
        std = getattr(backbone.config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)
        # backbone + pooling in one call, set by ``accel.apply`` (tuneval's CPU forward); None =
        # the backbone's own forward, then ``pool``.
        self.encoder_forward: Callable[..., torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last" and "position_ids" not in kw:
            # Causal LMs count positions by index: under left padding the first real token must
            # still be position 0, or the same text gets other logits in another batch.
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.encoder_forward is not None and set(kw) <= {"token_type_ids"}:
            pooled = self.encoder_forward(self.backbone, input_ids, attention_mask, kw.get("token_type_ids"))
            return self.classifier(self.dropout(pooled))
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        return self.classifier(self.dropout(pooled))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """First token, or the last position whose attention mask is 1 (left or right padding)."""
    if pooling == "first":
        first = attention_mask.int().argmax(dim=1)  # first real token, also under left padding
        return hidden[torch.arange(hidden.size(0), device=hidden.device), first]
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def resolve_pooling(requested: str, config: Any) -> str:
    if requested != "auto":
        return requested
    return "last" if loading.is_causal_lm(config) else "first"


def build_model(run: Any, tokenizer: Any, info: dict[str, Any]) -> Classifier:
    return new_classifier(loading.source_of(run), run.model, tokenizer, len(info["label_names"]), run.train.dropout)


def new_classifier(
    model_path: loading.Source | str,
    model_spec: Any,
    tokenizer: Any,
    num_labels: int,
    dropout: float | None,
) -> Classifier:
    backbone = loading.load_backbone(model_path, model_spec.revision, model_spec.trust_remote_code)
    if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
        backbone.resize_token_embeddings(len(tokenizer))
    cfg = backbone.config
    if dropout is None:
        dropout = next(
            (
                getattr(cfg, a)
                for a in ("hidden_dropout_prob", "resid_pdrop", "dropout", "hidden_dropout")
                if isinstance(getattr(cfg, a, None), float)
            ),
            0.1,
        )
    return Classifier(backbone, num_labels, resolve_pooling(model_spec.pooling, cfg), dropout)


def save_model(model: Classifier, tokenizer: Any, folder: Path, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(folder / "backbone")
    tokenizer.save_pretrained(folder / "backbone")
    head = {k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(head, str(folder / HEAD_FILE))
    (folder / HEAD_CONFIG).write_text(
        json.dumps(
            {
                "problem": NAME,
                "pooling": model.pooling,
                "dropout": model.dropout.p,
                "num_labels": model.classifier.out_features,
                "label_names": info["label_names"],
            },
            indent=1,
        )
    )


def load_model(folder: Path) -> tuple[Classifier, Any, dict[str, Any]]:
    """Rebuild a fine-tuned classifier from its folder: (model, tokenizer, head config)."""
    from safetensors.torch import load_file

    head_cfg = json.loads((folder / HEAD_CONFIG).read_text())
    backbone = loading.load_backbone(str(folder / "backbone"))
    tokenizer = loading.load_tokenizer(str(folder / "backbone"))
    model = Classifier(backbone, head_cfg["num_labels"], head_cfg["pooling"], head_cfg["dropout"])
    model.classifier.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return model, tokenizer, {"label_names": head_cfg["label_names"]}


# ---------------------------------------------------------------- loss, evaluation, post-processing


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**model_inputs(batch))
    return F.cross_entropy(logits.float(), batch["labels"])


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**model_inputs(batch))


def _logits(model: nn.Module, tokenizer: Any, ds: Any, rt: Runtime) -> torch.Tensor:
    from tuneval.inference.batched import predict_outputs

    return predict_outputs(
        model,
        ds,
        forward_logits,
        tokenizer.pad_token_id,
        tokenizer.padding_side,
        rt.device,
        rt.batch_size,
        rt.precision,
        progress=rt.progress,
    )


def evaluate(model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on the validation split (the model is left in eval mode)."""
    logits = _logits(model, tokenizer, ds, rt)
    labels = torch.tensor(ds["labels"])
    results, _ = score({"label": labels.tolist(), "prediction": logits.argmax(-1).tolist()}, ["accuracy", "f1"], info)
    return {"loss": float(F.cross_entropy(logits, labels)), **results}


def predict(model: nn.Module, tokenizer: Any, ds: Any, info: dict[str, Any], rt: Runtime) -> dict[str, list[Any]]:
    """Per-example rows: id, gold and predicted label (id and name), probability, logits."""
    logits = _logits(model, tokenizer, ds, rt)
    names, labels = info["label_names"], ds["labels"]
    probs = logits.softmax(dim=-1)
    pred = probs.argmax(dim=-1).tolist()
    return {
        "example_id": ds["example_id"],
        "label": labels,
        "label_name": [str(names[i]) for i in labels],
        "prediction": pred,
        "prediction_name": [str(names[i]) for i in pred],
        "probability": [float(probs[i, p]) for i, p in enumerate(pred)],
        "logits": logits.tolist(),
    }


def score(
    table: dict[str, list[Any]],
    names: list[str],
    info: dict[str, Any],
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics from stored predictions, plus scikit-learn's per-class report."""
    from sklearn.metrics import classification_report, confusion_matrix

    from tuneval import metrics

    label_names = info["label_names"]
    refs, preds = table["label"], table["prediction"]
    ids = list(range(len(label_names)))
    results: dict[str, float] = {}
    for name in names:
        kwargs = {"labels": ids} if name != "accuracy" else {}
        results.update(metrics.load(name).compute(predictions=preds, references=refs, **kwargs))
    report = {
        "per_class": classification_report(
            refs, preds, labels=ids, target_names=[str(n) for n in label_names], output_dict=True, zero_division=0
        ),
        "confusion_matrix": confusion_matrix(refs, preds, labels=ids).tolist(),
        "label_names": [str(n) for n in label_names],
    }
    return results, report
