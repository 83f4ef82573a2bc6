"""``benchmarks:`` in pipelines.yaml: data sources and, per problem, columns, lengths and metrics."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, PositiveInt, model_validator

from tuneval.config.base import SplitName, Strict


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
