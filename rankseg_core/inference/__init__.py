"""Turning a model's outputs into predictions: whole / sliding-window / multi-scale per-pixel inference and Mask2Former's semantic and panoptic inference."""
