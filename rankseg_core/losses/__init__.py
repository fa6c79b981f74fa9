"""Training losses: RankSeg's segmentation and multi-label losses, the Mask2Former set criterion with its matcher, point sampling and targets."""
