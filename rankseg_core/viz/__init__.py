"""`rankseg viz`: figures of what a model learned, each with its numbers as CSV / JSON.

- `tau`: learned 1/tau and bias per rank (paper Fig. 7);
- `false_positives`: existence probabilities per image and the most frequent false-positive
  classes in the top-kappa and in the prediction, optionally against a baseline;
- `predictions`: image, ground truth and each model's errors side by side;
- `prototypes`: which of its class's M prototypes each pixel took (ProtoSeg heads);
- `samples`: a shard browser with label overlays and class names.
"""
