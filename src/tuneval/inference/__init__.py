"""Inference: batched forward passes and generation."""
