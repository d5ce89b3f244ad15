"""Evaluation metrics and the A/B decision, independent of the model family: the metric models (CLIP, ViT/DINOv2,
an aesthetic head) from local folders, text metrics, the paired bootstrap and gate, the eval inputs and their
preflight. The stage that renders the arms is `trainer.training.evaluation`; imports families, runs, data and
the vocabulary only."""
