"""Forward passes only: backbones, the Segmenter + RankSeg head, the multi-label classifier,
Mask2Former (+ RankSeg), and the one class selection every head uses (selection.py)."""
