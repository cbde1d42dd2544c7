"""Evaluation: the model card's benchmarks from local files, and an lm-evaluation-harness adapter."""
