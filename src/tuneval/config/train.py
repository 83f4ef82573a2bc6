"""``train:`` in pipelines.yaml: one fine-tuning recipe (defaults, overridden per pipeline).

Numbers stay lax on purpose: PyYAML reads ``3e-5`` as a string, and pydantic's lax mode
turns a numeric string into a float.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from tuneval.config.base import Strict


class TopK(Strict):
    """Train the head and the top ``top_k`` transformer layers; freeze the rest."""

    top_k: PositiveInt


class LoraSpec(Strict):
    """LoRA adapters (peft) on the backbone's projections; the backbone's own weights stay frozen and
    the task head (and any other newly initialised module) stays fully trainable."""

    type: Literal["lora"] = "lora"
    r: PositiveInt = Field(8, description="rank of each adapter's A (r x in) and B (out x r) matrices")
    alpha: PositiveFloat = Field(16, description="scaling: the adapter's update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        description="names of the Linear layers to adapt (a name matches a module whose dotted path ends "
        "with it, e.g. q_proj); auto = the attention and MLP projections of the architecture",
        min_length=1,
    )


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
    adapter: LoraSpec | None = Field(
        None, description="train LoRA adapters + the head instead of every weight (needs trainable: all)"
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the backbone's activations in the backward pass instead of keeping them: "
        "less peak memory, about a third more compute, the same result (speed-only: not in the cache key)",
    )
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

    @model_validator(mode="after")
    def _adapter_trains_all(self) -> TrainSettings:
        if self.adapter is not None and self.trainable != "all":
            raise ValueError(
                "adapter: LoRA trains the adapters and the head, so trainable must stay 'all' "
                f"(got {self.trainable!r}); drop one of the two"
            )
        return self
