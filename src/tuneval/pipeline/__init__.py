"""The pipeline: stage keys, the artifact store, the stages, the finetune dispatch, the runner."""
