"""VSPW's video consistency VC_n (Miao et al., CVPR 2021), as an accumulator.

The authors' definition (their evaluation scripts `VC_perclip*.py`, re-derived here, not copied):
for each video, its annotated frames in temporal order f_0 .. f_{L-1}; for each window of n
consecutive frames starting at i, the pixels whose GT value is the same in all n frames are
"GT-consistent"; the window's ratio is (GT-consistent pixels whose predictions are also the same
in all n frames) / (GT-consistent pixels). VC_n is the mean of the window ratios pooled over all
windows of all videos (not a mean of per-video means). Every detail reproduces theirs:

- windows start at i = 0 .. L-n-1: the authors loop `range(L - n)`, so the last possible window
  (starting at L-n) is never scored and a video of L <= n frames contributes nothing;
- a window without GT-consistent pixels has ratio 0/0 = NaN and is left out of the mean (their
  `np.nanmean`); VC_n is NaN when no window has a defined ratio;
- every pixel takes part: ignore pixels are compared like any other value (their GT "others" 0
  and void 255 are raw values, so a pixel that is void in all n frames is GT-consistent and its
  predictions must agree too). Shards store both 0 and 255 as one ignore value, so a pixel that
  changes between "others" and void within a window counts as GT-consistent here, not there.

Memory stays bounded for any video length: a pixel's GT (or prediction) is the same over the n
frames ending at frame t exactly when its run of equal values ending at t is >= n frames long,
so a stream keeps the previous frame's GT and prediction and two run-length maps (capped at the
largest n), whatever n and L are. The window ending at frame t is scored when frame t+1 arrives
(that is the authors' dropped last window).

Videos must not be split between accumulators (DDP ranks): a window across the cut would be
lost. `state()` names the videos seen and `merge` refuses states that share one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rankseg_core.errors import UserError

ArrayLike = np.ndarray | torch.Tensor

VSPW_WINDOWS = (8, 16)  # the VC_8 and VC_16 the VSPW paper reports


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"label maps must be H x W, got shape {a.shape}")
    return a


@dataclass
class _Stream:
    """The open video: its previous frame and how long each pixel's values have not changed."""

    video: str
    frames: int  # frames fed so far
    last_frame: int | None  # the previous frame's position (shards' `frame`), for the order check
    gt: np.ndarray  # previous frame's GT (H x W)
    pred: np.ndarray  # previous frame's prediction
    gt_run: np.ndarray  # frames, ending at the previous one, with the same GT value (capped)
    pred_run: np.ndarray  # the same for the prediction


class VideoConsistency:
    """VC_n for every n in `window_sizes` (default VC_8 and VC_16), pooled over windows.

    `update(video, pred, gt)` feeds the next annotated frame of `video` (H x W predicted and GT
    label maps, tensors or arrays); a video's frames must come in temporal order and together:
    a new video name ends the previous video, and a video that was ended cannot come back
    (ValueError). `update_video` feeds a whole video. State: per n, the sum of the defined
    window ratios and their count (float64 / int), plus the names of the videos seen.
    """

    reduce_by_sum = False  # the state holds video names: gathered (tiny), merged in rank order

    def __init__(self, window_sizes: Sequence[int] = VSPW_WINDOWS) -> None:
        sizes = tuple(int(n) for n in window_sizes)
        if not sizes or any(not 2 <= n <= 65535 for n in sizes) or len(set(sizes)) != len(sizes):
            # run lengths are uint16 maps, capped at the largest n
            raise ValueError(f"window sizes must be distinct integers in 2..65535, got {list(window_sizes)}")
        self.window_sizes = sizes
        self.reset()

    def reset(self) -> None:
        self._sums = np.zeros(len(self.window_sizes), np.float64)
        self._windows = np.zeros(len(self.window_sizes), np.int64)  # windows with a defined ratio
        self._undefined = np.zeros(len(self.window_sizes), np.int64)  # 0/0 windows (left out)
        self._videos: set[str] = set()
        self._stream: _Stream | None = None

    # -- feeding ------------------------------------------------------------------------

    def update(self, video: str, pred: ArrayLike, gt: ArrayLike, frame: int | None = None) -> None:
        """Add the next annotated frame of `video`. `frame` (optional): its position in the
        video; when given it must increase within a video (gaps are fine: windows run over the
        annotated frames, as the authors' list of mask files does)."""
        p, g = _to_numpy(pred), _to_numpy(gt)
        if p.shape != g.shape:
            raise ValueError(f"{video}: prediction {p.shape} and GT {g.shape} differ in size")
        s = self._stream
        if s is None or s.video != video:
            if video in self._videos:
                raise ValueError(f"video {video!r} was already ended: feed each video's frames together, in order")
            self._videos.add(video)
            self._stream = _Stream(video, 1, frame, g.copy(), p.copy(), np.ones(g.shape, np.uint16),
                                   np.ones(g.shape, np.uint16))
            return
        if g.shape != s.gt.shape:
            raise UserError(f"video {video}: frames differ in size ({s.gt.shape[1]}x{s.gt.shape[0]} and "
                            f"{g.shape[1]}x{g.shape[0]}); VC needs one size per video: re-convert the shards")
        if frame is not None and s.last_frame is not None and frame <= s.last_frame:
            raise ValueError(f"video {video!r}: frame {frame} after frame {s.last_frame}; feed frames in order")
        # A frame follows: the window ending at the previous frame is not the video's last one,
        # so it is scored (the authors never score the last window).
        self._score(s)
        cap = max(self.window_sizes)  # runs longer than the largest n need not be told apart
        s.gt_run = np.where(g == s.gt, np.minimum(s.gt_run + 1, cap), 1).astype(np.uint16)
        s.pred_run = np.where(p == s.pred, np.minimum(s.pred_run + 1, cap), 1).astype(np.uint16)
        s.gt, s.pred = g.copy(), p.copy()
        s.frames += 1
        s.last_frame = frame

    def _score(self, s: _Stream) -> None:
        """Score, for each n, the window of n frames ending at the stream's previous frame."""
        for k, n in enumerate(self.window_sizes):
            if s.frames < n:
                continue
            consistent = s.gt_run >= n
            total = int(consistent.sum())
            if not total:
                self._undefined[k] += 1
                continue
            self._sums[k] += int((consistent & (s.pred_run >= n)).sum()) / total
            self._windows[k] += 1

    def update_video(self, video: str, preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]) -> None:
        """Add a whole video: its predicted and GT maps in temporal order; ends it."""
        if len(preds) != len(gts):
            raise ValueError(f"{video}: {len(preds)} predictions but {len(gts)} GT maps")
        for p, g in zip(preds, gts):
            self.update(video, p, g)
        self.end_video()

    def end_video(self) -> None:
        """End the open video (frees its maps; its last window is not scored, as the authors')."""
        self._stream = None

    # -- state, merge, compute ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """{"window_sizes", "sums", "windows", "undefined", "videos"}: picklable; the open
        video's windows scored so far are included (windows are scored as frames arrive)."""
        return {"window_sizes": list(self.window_sizes), "sums": self._sums.tolist(),
                "windows": self._windows.tolist(), "undefined": self._undefined.tolist(),
                "videos": sorted(self._videos)}

    def merge(self, other: VideoConsistency | dict[str, Any]) -> VideoConsistency:
        """Add another accumulator (or its `state()`) in place; returns self. ValueError when
        both saw one video: its frames were split, and the windows across the cut are lost."""
        s = other.state() if isinstance(other, VideoConsistency) else other
        if tuple(s["window_sizes"]) != self.window_sizes:
            raise ValueError("cannot merge video consistency accumulators with different window sizes")
        shared = self._videos.intersection(s["videos"])
        if shared:
            raise ValueError(f"video {sorted(shared)[0]!r} was fed to two accumulators: a video's frames "
                             "must all go to one (its windows cannot be split)")
        self._sums += np.asarray(s["sums"], np.float64)
        self._windows += np.asarray(s["windows"], np.int64)
        self._undefined += np.asarray(s["undefined"], np.int64)
        self._videos.update(s["videos"])
        return self

    @property
    def num_videos(self) -> int:
        return len(self._videos)

    def num_windows(self, n: int) -> int:
        """Windows of n frames with a defined ratio (those VC_n averages)."""
        return int(self._windows[self.window_sizes.index(n)])

    def compute(self) -> dict[int, float]:
        """{n: VC_n} in [0, 1]; NaN where no window of n frames had GT-consistent pixels."""
        return {n: float(self._sums[k] / self._windows[k]) if self._windows[k] else float("nan")
                for k, n in enumerate(self.window_sizes)}
