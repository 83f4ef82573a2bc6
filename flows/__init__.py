"""Prefect flows: wiring only. Config is validated by the caller before any flow starts."""
