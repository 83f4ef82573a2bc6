"""One thin Prefect task per stage. Caching is the artifact store's (content keys), so each
task opts out of Prefect's own result cache, whose default key includes the flow-run id."""

from tasks.finetune import finetune_task, fused_finetune_task
from tasks.intrinsic import intrinsic_task
from tasks.load import load_task
from tasks.predict import predict_task
from tasks.prepare import prepare_task
from tasks.score import score_task

__all__ = [
    "finetune_task",
    "fused_finetune_task",
    "intrinsic_task",
    "load_task",
    "predict_task",
    "prepare_task",
    "score_task",
]
