"""Tracking: the MLflow client (the only mlflow import) and the records of runs and seed groups."""
