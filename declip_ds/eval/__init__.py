"""Evaluation: zero-shot classification (linear probe and retrieval come with the evaluation suite)."""

from declip_ds.eval.zero_shot import zero_shot_classifier, zero_shot_evaluate

__all__ = ["zero_shot_classifier", "zero_shot_evaluate"]
