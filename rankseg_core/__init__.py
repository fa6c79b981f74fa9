"""rankseg: large-vocabulary segmentation with RankSeg (He et al., ECCV 2022)."""

__version__ = "0.1.0"
