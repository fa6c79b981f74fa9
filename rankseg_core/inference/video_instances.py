"""YouTube-VIS instance inference: whole-video Mask2Former-VIS, tracks for the submission format.

Semantics of the official `inference_video` (facebookresearch/Mask2Former,
mask2former_video/video_maskformer_model.py), re-written, not copied:

- the whole video is ONE clip: all T frames go through the model at once, so a query is one
  track over the video (no joining of clips is needed);
- scores: softmax over the K + 1 class logits of each query, the no-object column dropped;
  the top-k (default 10) (query, class) pairs of the Q x K scores per video are kept (a query
  may be kept with several classes). The score of a track is that softmax probability alone:
  unlike the image instance inference, the VIS inference does NOT multiply it by the mask's
  mean sigmoid inside the mask;
- masks: the query's mask logits of each frame, bilinearly upsampled to the padded input
  (4x the mask resolution), cropped to the unpadded image, bilinearly resized to the original
  frame size, thresholded at 0 (sigmoid 0.5).

Differences, none of which changes a scored number:

- Memory: the official code upsamples all Q queries x T frames to full resolution and then
  picks the top-k. Bilinear resizing is per channel, so picking the k queries first and
  upsampling frame by frame gives the same masks; here only one frame's k full-resolution
  masks exist at a time (k x H x W floats instead of Q x T x H x W), and each is RLE-encoded
  at once. The low-resolution Q x T x h x w logits and the backbone features of all frames
  are held, as in the official code (bench/bench_video_memory.py, docs/benchmarks.md).
- An empty frame mask is written as `null` instead of an RLE of an empty mask: the
  spatio-temporal IoU and a track's area (mean of its non-zero frame areas) are the same for
  both, and the file is smaller.
- Ties between equal scores are broken by (query, class) order (a stable sort), where the
  official `topk(sorted=False)` leaves the order to the device.
- RankSeg models predict only the selected classes: their columns are scattered back to K + 1
  with FILL_LOGIT (-100) elsewhere (`full_class_logits`), as the semantic inference does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor, nn

from rankseg_core.evaluation.video_instances import PredictedTrack, Rle
from rankseg_core.inference.mask2former import full_class_logits
from rankseg_core.model.mask2former.video import VideoMask2FormerOutput
from rankseg_core.model.selection import NO_SELECTION, Selection

TOP_K = 10  # the official TEST.DETECTIONS_PER_IMAGE of the VIS configs


def top_pairs(logits: Tensor, top_k: int = TOP_K) -> tuple[Tensor, Tensor, Tensor]:
    """Q x (K+1) class logits (no-object last) -> (query, class, score) of the top-k pairs.

    Scores are softmax probabilities over the K + 1 columns with no-object dropped, ranked over
    all Q x K pairs, highest first; equal scores keep (query, class) order. Fewer than top_k
    pairs when Q x K is smaller.
    """
    probs = logits.float().softmax(-1)[:, :-1]
    k = probs.shape[1]
    flat = probs.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:top_k]
    return order // k, order % k, flat[order]


def frame_masks(masks: Tensor, image_size: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """n x h x w mask logits of one frame -> n x H x W booleans at the original `size`.

    As the official post-processing: to the padded input (4h x 4w), crop the unpadded
    `image_size`, resize to `size`, threshold at 0.
    """
    x = F.interpolate(masks[None].float(), size=(masks.shape[-2] * 4, masks.shape[-1] * 4), mode="bilinear",
                      align_corners=False)[..., : image_size[0], : image_size[1]]
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x[0] > 0


def encode_masks(masks: np.ndarray) -> list[Rle | None]:
    """n x H x W booleans -> one compressed RLE per mask (counts as str), None for an empty mask."""
    if not len(masks):
        return []
    # pycocotools wants H x W x n uint8 in Fortran order
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    out: list[Rle | None] = []
    for m, r in zip(masks, rles):
        if not m.any():
            out.append(None)
            continue
        c = r["counts"]
        out.append({"size": [int(r["size"][0]), int(r["size"][1])],
                    "counts": c.decode() if isinstance(c, bytes) else c})
    return out


def tracks_from_output(out: VideoMask2FormerOutput, size: tuple[int, int], top_k: int = TOP_K,
                       index: int = 0) -> list[PredictedTrack]:
    """Tracks of clip `index` of a clip output (the whole video as one clip), highest score first.

    size: the original frame size (H, W) the masks are written at. Frame by frame, only the k
    kept queries are upsampled (see the module docstring for why this equals the official order).
    """
    logits = full_class_logits(out)[index]
    queries, classes, scores = top_pairs(logits, top_k)
    low = out.pred_masks[index, queries]  # k x T x h x w, low resolution
    per_frame: list[list[Rle | None]] = []
    for t in range(low.shape[1]):
        per_frame.append(encode_masks(frame_masks(low[:, t], out.image_size, size).cpu().numpy()))
    return [PredictedTrack(category=int(c), score=float(s), masks=[f[i] for f in per_frame])
            for i, (c, s) in enumerate(zip(classes.tolist(), scores.tolist()))]


@torch.no_grad()
def video_instance_predictions(model: nn.Module, frames: Tensor, size: tuple[int, int], top_k: int = TOP_K,
                               selection: Selection = NO_SELECTION) -> list[PredictedTrack]:
    """Whole-video inference of one video: frames T x 3 x H' x W' (normalised, at the test
    size, in temporal order) -> the top-k tracks, one RLE or None per frame at `size` (H, W).

    The model sees the T frames as one clip (`clip_len=T`), as the official VIS inference does.
    """
    if frames.ndim != 4 or not len(frames):
        raise ValueError(f"frames must be T x 3 x H x W with T >= 1, got {tuple(frames.shape)}")
    out = model(frames, selection, clip_len=int(frames.shape[0]))
    if not isinstance(out, VideoMask2FormerOutput):
        raise TypeError(f"a video Mask2Former output was expected, got {type(out).__name__}")
    return tracks_from_output(out, size, top_k)

