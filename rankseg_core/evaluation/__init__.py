"""Metrics and scoring: confusion matrix (mIoU), multi-label AP / recall@kappa, panoptic quality, and scoring prediction files."""
