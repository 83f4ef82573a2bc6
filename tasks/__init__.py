"""One thin Prefect task per stage. Caching is the artifact store's (content keys), so each
task opts out of Prefect's own result cache, whose default key includes the flow-run id."""

from tuneval.tasks.finetune import finetune_task, fused_finetune_task
from tuneval.tasks.intrinsic import intrinsic_task
from tuneval.tasks.load import load_task
from tuneval.tasks.predict import predict_task
from tuneval.tasks.prepare import prepare_task
from tuneval.tasks.score import score_task

__all__ = [
    "finetune_task",
    "fused_finetune_task",
    "intrinsic_task",
    "load_task",
    "predict_task",
    "prepare_task",
    "score_task",
]
