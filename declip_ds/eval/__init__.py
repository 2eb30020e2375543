"""Evaluation: zero-shot classification, linear probe (linear_probe.py), retrieval (retrieval.py), reports (report.py)."""

from declip_ds.eval.zero_shot import zero_shot_classifier, zero_shot_evaluate

__all__ = ["zero_shot_classifier", "zero_shot_evaluate"]
