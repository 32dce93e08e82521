"""Inference: build a model from a checkpoint's saved config at its saved layout, score and sample."""
