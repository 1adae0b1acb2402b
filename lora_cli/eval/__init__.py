"""Evaluation: the metric registry, `lora eval` over candidates, lm-evaluation-harness."""
