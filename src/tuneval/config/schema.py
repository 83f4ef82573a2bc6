"""The pipelines.yaml schema: frozen pydantic models that reject unknown keys.

Numbers stay lax on purpose: PyYAML reads ``3e-5`` as a string, and pydantic's lax mode
turns a numeric string into a float.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    field_validator,
    model_validator,
)

# Names become MLflow experiment/run names and cache path parts: no separators, no dots first.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
SplitName = Literal["train", "validation", "test"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopK(Strict):
    """Train the head and the top ``top_k`` transformer layers; freeze the rest."""

    top_k: PositiveInt


class TrainSettings(Strict):
    """One fine-tuning recipe. Every field has a default; pipelines override some."""

    epochs: PositiveInt = 3
    learning_rate: PositiveFloat = 3e-5
    batch_size: PositiveInt = 16
    gradient_accumulation_steps: PositiveInt = 1
    devices: PositiveInt = Field(
        1,
        description="data-parallel processes (one per GPU; gloo processes on CPU) that split each batch; "
        "batch_size stays the global batch and must be divisible by devices",
    )
    warmup_steps: NonNegativeInt = 0
    weight_decay: NonNegativeFloat = 0.01
    max_grad_norm: PositiveFloat | None = 1.0
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: PositiveFloat = 1e-8
    dropout: float | None = Field(None, ge=0, lt=1, description="head dropout; None = the backbone's")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    trainable: Literal["all", "head"] | TopK = "all"
    group_by_length: bool = True
    compile: bool = Field(
        False,
        description="torch.compile(dynamic=True) the training forward/backward; compiling takes tens of "
        "seconds, so it pays off on long GPU runs only; compiled dropout draws other masks than eager "
        "(same distribution), so with dropout a compiled run is another sample, not the eager run",
    )
    encoder_kernels: Literal["auto", "tuneval", "transformers"] = Field(
        "auto",
        description="classification with a BERT-family encoder: 'tuneval' trains, evaluates and predicts "
        "with tuneval's own forward (padding dropped, one Q/K/V matmul, the last layer for [CLS] only, "
        "cheaper dropout masks; measured faster on CPU only): the same function as transformers' to float "
        "rounding, but with dropout on it draws other masks, so a run is another sample of the recipe; "
        "'transformers' = the model's own forward (SDPA); 'auto' = tuneval's on CPU, transformers' elsewhere",
    )
    checkpoint: Literal["last", "best"] = "last"
    checkpoint_every_steps: PositiveInt | None = Field(
        None, description="also checkpoint every N optimizer steps (always at each epoch start); resume from it"
    )
    keep_checkpoints: PositiveInt = 2
    best_metric: str = "accuracy"
    eval_batch_size: PositiveInt = 64
    log_every_steps: PositiveInt = 10
    max_train_samples: PositiveInt | None = None
    max_eval_samples: PositiveInt | None = None
    max_test_samples: PositiveInt | None = None
    data_seed: NonNegativeInt = Field(
        0, description="seed of the sub-sampling done by max_*_samples (shared by all seeds)"
    )
    fuse_seeds: bool = Field(
        False,
        description="train a pipeline's seeds as one batched model in one pass (hashed dropout masks, "
        "eager attention); opt-in: not yet measured to pay on a GPU, and slower on a CPU",
    )


class DataSpec(Strict):
    """Where a benchmark's splits come from: local files or the Hugging Face Hub."""

    files: dict[SplitName, str] | None = None
    format: Literal["json", "csv", "parquet"] | None = None
    hub: str | None = None
    subset: str | None = None
    revision: str | None = None
    splits: dict[SplitName, str] | None = Field(
        None, description="our split -> hub split (slices such as 'train[:90%]' allowed)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.files is None) == (self.hub is None):
            raise ValueError("give exactly one of 'files' (local paths) or 'hub' (a dataset id)")
        if self.files is not None and "train" not in self.files:
            raise ValueError("'files' needs a 'train' split")
        if self.files is not None and "test" not in self.files:
            raise ValueError("'files' needs a 'test' split")
        if self.hub is None and (self.subset or self.revision or self.splits):
            raise ValueError("'subset', 'revision' and 'splits' only apply to 'hub' data")
        return self


class ClassificationColumns(Strict):
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    id: str | None = None


ClassificationMetric = Literal["accuracy", "f1", "precision", "recall"]


class ClassificationBenchmark(Strict):
    problem: Literal["classification"]
    data: DataSpec
    columns: ClassificationColumns = ClassificationColumns()
    labels: list[str | int] | None = Field(
        None, min_length=2, description="label order; default: sorted values seen in train"
    )
    max_length: PositiveInt = 128
    metrics: list[ClassificationMetric] = Field(["accuracy", "f1"], min_length=1)


class QAColumns(Strict):
    """The Hugging Face ``squad`` layout: answers = {"text": [...], "answer_start": [...]}."""

    id: str = "id"
    question: str = "question"
    context: str = "context"
    answers: str = "answers"


QAMetric = Literal["exact_match", "f1"]


class ExtractiveQABenchmark(Strict):
    problem: Literal["extractive_qa"]
    data: DataSpec
    columns: QAColumns = QAColumns()
    max_length: PositiveInt = Field(384, description="tokens per window: question + context + special tokens")
    doc_stride: PositiveInt = Field(128, description="tokens of context shared by consecutive windows")
    n_best: PositiveInt = Field(20, description="start and end candidates per window in post-processing")
    max_answer_length: PositiveInt = Field(30, description="longest answer span, in tokens")
    version_2_with_negative: bool = Field(False, description="SQuAD v2: questions may have no answer")
    null_score_diff_threshold: float = Field(
        0.0, description="v2: answer '' when null score - best span score exceeds this"
    )
    metrics: list[QAMetric] = Field(["exact_match", "f1"], min_length=1)

    @model_validator(mode="after")
    def _stride_below_length(self) -> ExtractiveQABenchmark:
        if self.doc_stride >= self.max_length:
            raise ValueError(
                f"doc_stride ({self.doc_stride}) must be smaller than max_length ({self.max_length}); "
                "windows overlap by doc_stride tokens (e.g. max_length 384, doc_stride 128)"
            )
        return self


class Seq2SeqColumns(Strict):
    """Column names; a dotted name reads a nested field (``translation.en`` for the wmt layout)."""

    source: str = "source"
    target: str = "target"
    id: str | None = None


class GenerationSettings(Strict):
    """How predictions are generated (greedy when num_beams is 1)."""

    num_beams: int = Field(1, ge=1, le=16, description="1 = greedy; more = beam search")
    max_new_tokens: int = Field(64, ge=1, le=1024)
    length_penalty: float = Field(1.0, ge=-5.0, le=5.0, description="beam search only; >1 favours longer outputs")
    no_repeat_ngram_size: int = Field(0, ge=0, le=10, description="0 = off")
    batch_size: int = Field(16, ge=1, le=1024, description="examples per generate() call")

    @model_validator(mode="after")
    def _beam_only(self) -> GenerationSettings:
        if self.num_beams == 1 and self.length_penalty != 1.0:
            raise ValueError("length_penalty only applies to beam search; set num_beams > 1 or drop length_penalty")
        return self


Seq2SeqMetric = Literal["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "perplexity"]


class Seq2SeqBenchmark(Strict):
    problem: Literal["seq2seq"]
    data: DataSpec
    columns: Seq2SeqColumns = Seq2SeqColumns()
    prefix: str = Field("", description="task prefix put before every source, e.g. 'summarize: ' (T5 style)")
    max_source_length: PositiveInt = 256
    max_target_length: PositiveInt = 64
    generation: GenerationSettings = GenerationSettings()
    metrics: list[Seq2SeqMetric] = Field(["rouge1", "rouge2", "rougeL", "rougeLsum", "perplexity"], min_length=1)

    @property
    def max_length(self) -> int:
        """The source budget: what the prepare summary counts truncation against."""
        return self.max_source_length


BenchmarkSpec = Annotated[
    Union[ClassificationBenchmark, ExtractiveQABenchmark, Seq2SeqBenchmark], Field(discriminator="problem")
]


class ModelSpec(Strict):
    source: str = Field(description="hub id, local folder, or package:NAME")
    revision: str | None = None
    trust_remote_code: bool = False
    pooling: Literal["auto", "first", "last"] = Field(
        "auto", description="auto: first token for encoders, last real token for causal LMs"
    )


class Schedule(Strict):
    """When a pipeline recurs (used by `tuneval serve`/`deploy`): standard 5-field cron."""

    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, cron: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(cron, datetime(2000, 1, 1))
        except CronSimError as e:
            raise ValueError(f"cron {cron!r} does not parse ({e}); use 5 fields, e.g. '0 3 * * 1'") from None
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, tz: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {tz!r}; use an IANA name such as 'Europe/Berlin' or 'UTC'") from None
        return tz


class PipelineSpec(Strict):
    description: str | None = None
    schedule: Schedule | None = None
    models: list[Name] = Field(min_length=1)
    benchmarks: list[Name] = Field(min_length=1)
    seeds: list[int] = Field([42], min_length=1)
    train: dict[str, object] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct (got {seeds})")
        return seeds


class Defaults(Strict):
    train: dict[str, object] = Field(default_factory=dict)


class Config(Strict):
    defaults: Defaults = Defaults()
    models: dict[Name, ModelSpec]
    benchmarks: dict[Name, BenchmarkSpec]
    pipelines: dict[Name, PipelineSpec]
