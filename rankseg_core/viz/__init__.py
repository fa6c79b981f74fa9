"""`rankseg viz`: figures of what a model learned, each with its numbers as CSV / JSON.

- `tau`: learned 1/tau and bias per rank (paper Fig. 7);
- `false_positives`: existence probabilities per image and the most frequent false-positive
  classes in the top-kappa and in the prediction, optionally against a baseline;
- `predictions`: image, ground truth and each model's errors side by side;
- `samples`: a shard browser with label overlays and class names.
"""

from rankseg_core.viz.common import VizRun, load_viz_run
from rankseg_core.viz.false_positives import false_positive_stats, fp_table, run_false_positives
from rankseg_core.viz.predictions import run_predictions
from rankseg_core.viz.samples import run_samples
from rankseg_core.viz.tau import TauCurve, plot_tau, tau_curve, write_tau

__all__ = [
    "TauCurve",
    "VizRun",
    "false_positive_stats",
    "fp_table",
    "load_viz_run",
    "plot_tau",
    "run_false_positives",
    "run_predictions",
    "run_samples",
    "tau_curve",
    "write_tau",
]
